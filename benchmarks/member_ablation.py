"""What each member of a finished `nikl_cpu.py` run is worth to its ensemble: the ensemble stage
run again over that run's own features, once with each member left out.

    python benchmarks/member_ablation.py --run results/bench                 # every member
    python benchmarks/member_ablation.py --run results/bench --members use-lr

Nothing is trained again: each ablation is a results root of its own under `<run>/ablation/`
whose folds, pretraining, fold models and features are links to the run's, so only its ensemble
stage (heads, cross-fitted decision rules) is new. The scores are the cross-fitted out-of-fold
ones the run reports, beside the run's own in the same table. Writes `member_ablation.json` /
`.md` under the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import nikl_cpu  # noqa: E402

import nikl_ray as nr  # noqa: E402
from nikl_ray.config import parse_experiment  # noqa: E402
from nikl_ray.tables import markdown, write_result  # noqa: E402

SHARED = ("split", "pretrain", "train", "features", "tiny_backbones")  # what an ablation reads of the run


def run_args(bench: dict, results: Path) -> list[str]:
    """nikl_cpu's arguments for the configuration a benchmark.json records."""
    args = ["--data-dir", bench["data"], "--results", str(results), "--folds", str(bench["folds"]),
            "--epochs", str(bench["epochs"]), "--budget-minutes", str(bench["budget_minutes"]),
            "--pretrain-share", str(bench["pretrain_share"]), "--decoder-share", str(bench["decoder_share"]),
            "--target-encoding", bench["target_encoding"], "--classical", *bench["classical"]]
    return args + (["--holdout-dev"] if bench["holdout_dev"] else [])


def without(run: Path, bench: dict, member: str) -> dict:
    """The crossfit scores of the run's ensemble stage with `member` left out."""
    root = run / "ablation" / f"without-{member}"
    root.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if not (root / name).exists():
            (root / name).symlink_to((run / name).resolve(), target_is_directory=True)
    args = nikl_cpu.parser().parse_args(run_args(bench, root))
    raw = nikl_cpu.experiment(args, Path(bench["data"]))
    raw["backbones"] = [b for b in raw["backbones"] if b["name"] != member]
    raw["classical"] = [c for c in raw["classical"] if c != member]
    opened = nr.open_run(parse_experiment(raw, REPO, "benchmark"))
    nr.connect(opened, local=True)
    report = json.loads(nr.ensemble(opened).with_suffix(".json").read_text())
    return {"stack": report["crossfit_score"]["stack"], "submitted": report["chosen"]["name"],
            "submitted_score": report["chosen"]["score"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the results root of a finished nikl_cpu.py run")
    ap.add_argument("--members", nargs="+", help="the members to leave out, one at a time (default: each)")
    args = ap.parse_args(argv)
    run = Path(args.run).resolve()
    if not (run / "benchmark.json").exists():
        print(f"{run} has no benchmark.json: pass the --results of a finished nikl_cpu.py run", file=sys.stderr)
        return 2
    from nikl_ray.cli import setup_logging

    setup_logging(0)
    bench = json.loads((run / "benchmark.json").read_text())
    report = json.loads((run / "ensemble" / "report.json").read_text())
    members = args.members or report["members"]
    unknown = sorted(set(members) - set(report["members"]))
    if unknown:
        print(f"not members of this run: {unknown} (its members: {report['members']})", file=sys.stderr)
        return 2
    started = time.time()
    table = [{"members": "all (the run)", "stack": report["crossfit_score"]["stack"],
              "submitted": f"{report['chosen']['name']} {report['chosen']['score']:.4f}", "member's worth to the stack (points)": None}]
    for m in members:
        got = without(run, bench, m)
        table.append({"members": f"without {m}", "stack": got["stack"],
                      "submitted": f"{got['submitted']} {got['submitted_score']:.4f}",
                      "member's worth to the stack (points)": round(100 * (table[0]["stack"] - got["stack"]), 2)})
    write_result(run / "member_ablation.json", {"run": str(run), "table": table, "seconds": time.time() - started},
                 f"# Members left out one at a time ({run.name}; cross-fitted out-of-fold micro-F1)\n\n{markdown(table)}\n\n"
                 f"{(time.time() - started) / 60:.1f} min in all.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
