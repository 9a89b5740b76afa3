"""Test rows routed to one fold model against test rows bagged over all of them, on labelled held-out rows.

    python benchmarks/test_rows.py                      # NIKL (train → dev) and NSMC-like (30,000 rows → the next 10,000)
    python benchmarks/test_rows.py --only nikl --folds 5

One run of the pipeline per data set, the "test" file a labelled slice the run never learns
from: NIKL trains on train.jsonl and answers dev.jsonl; the NSMC-like set trains on the train
file's first `--nsmc-rows` rows and answers the `--nsmc-test-rows` after them. Two tiny
random-init backbones (ELECTRA, GPT-NeoX) and the classical members `tfidf-lr` and `nbsvm`, as
`nikl_cpu.py --no-pretrain` builds them. Every fold model answers every test row, so the ensemble
writes each candidate's test answers both ways (`ensemble.test_rows`): routed (one fold model and
one inner fold of heads per row, as its out-of-fold rows are answered) and bagged (every fold
model and inner fold, averaged). Each candidate's two answers are scored on the slice's labels
(micro-F1; accuracy for the single-label reviews), beside its cross-fitted out-of-fold score.
Also written: seconds per stage and per Train run.

Writes `test_rows.json` / `.md` under `--results`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import nikl_ray as nr  # noqa: E402
from nikl_ray.artifacts import load_manifest, read_json, write_json, write_text  # noqa: E402
from nikl_ray.config import parse_experiment  # noqa: E402
from nikl_ray.data import read_rows  # noqa: E402
from nikl_ray.metrics import primary_score  # noqa: E402
from nikl_ray.tables import markdown  # noqa: E402


def nikl(args, out: Path) -> tuple[dict, Path]:
    import nikl_cpu

    raw = nikl_cpu.holdout_experiment(args.nikl, str(out / "nikl"), args.folds, args.epochs, ["tfidf-lr", "nbsvm"])
    return raw, Path(args.nikl) / "dev.jsonl"


def nsmc(args, out: Path) -> tuple[dict, Path]:
    lines = (Path(args.nsmc) / "ratings_train.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    n, m = args.nsmc_rows, args.nsmc_test_rows
    files = {"train": out / "nsmc-data" / "train.txt", "test": out / "nsmc-data" / "heldout.txt"}
    files["train"].parent.mkdir(parents=True, exist_ok=True)
    files["train"].write_text(header + "".join(body[:n]), encoding="utf-8")
    files["test"].write_text(header + "".join(body[n:n + m]), encoding="utf-8")
    raw = {
        "task": "sentence-sentiment", "train": [str(files["train"])], "test": str(files["test"]),
        "results": str(out / "nsmc"), "folds": {"k": args.folds, "seed": 42},
        "defaults": {"epochs": args.epochs, "batch_size": 32, "max_length": 64, "early_stopping_patience": 2, "lr": 1e-3,
                     "mode": "full"},
        "backbones": [{"name": "electra-tiny", "checkpoint": "tiny:electra"},
                      {"name": "neox-tiny", "checkpoint": "tiny:gpt_neox"}],
        "classical": ["tfidf-lr", "nbsvm"],
        "ensemble": {"hidden_sizes": [64, 128, 256], "inner_folds": 3, "epochs": 100, "patience": 10},
    }
    return raw, files["test"]


def measure(name: str, raw: dict, heldout: Path, num_cpus: int | None) -> dict:
    started = time.time()
    run = nr.open_run(parse_experiment(raw, REPO, name))
    nr.connect(run, local=True, num_cpus=num_cpus)
    out = nr.pipeline(run)
    exp, layout = run.exp, run.layout
    report = read_json(layout.report_json)
    truth = read_rows(heldout, exp.task)
    ways = {report["test_rows"]: report["submissions"], **{
        way: report["submissions_other_test_rows"] for way in ("routed", "bagged") if way != report["test_rows"]}}
    scored = {way: {n: primary_score(truth.labels, read_rows(layout.ensemble / p, exp.task).labels, exp.task.multi_label)
                    for n, p in subs.items()} for way, subs in ways.items()}
    runs = {f"{s.name}-fold{f}": load_manifest(layout.pair(s.name, f))["wall_seconds"]
            for s in exp.backbones for f in range(exp.folds.k)}
    return {"rows": report["rows"], "heldout_rows": len(truth), "metric": report["metric"],
            "chosen": report["chosen"]["name"], "oof": report["crossfit_score"], "heldout": scored,
            "stage_seconds": out["stage_seconds"], "train_run_seconds": runs, "total_seconds": time.time() - started}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nikl", default=str(REPO.parent / "shared" / "data" / "nikl_ea_2023"))
    ap.add_argument("--nsmc", default=str(REPO.parent / "shared" / "data" / "nsmc_like"))
    ap.add_argument("--nsmc-rows", type=int, default=30_000)
    ap.add_argument("--nsmc-test-rows", type=int, default=10_000)
    ap.add_argument("--only", choices=["nikl", "nsmc"])
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--results", default=str(REPO / "results" / "test-rows-bench"))
    ap.add_argument("--num-cpus", type=int)
    args = ap.parse_args(argv)
    from nikl_ray.cli import setup_logging

    setup_logging(0)
    out = Path(args.results).resolve()
    sets = {"NIKL (train → dev)": nikl, f"NSMC-like ({args.nsmc_rows} → next {args.nsmc_test_rows})": nsmc}
    results, lines = {}, [f"# Test rows routed against bagged, {args.folds} folds, {args.epochs} epochs\n"]
    for name, make in sets.items():
        if args.only and not name.lower().startswith(args.only):
            continue
        raw, heldout = make(args, out)
        r = results[name] = measure(name, raw, heldout, args.num_cpus)
        table = [{"candidate": n, "out-of-fold (cross-fitted)": s, "held-out, routed": r["heldout"]["routed"].get(n),
                  "held-out, bagged": r["heldout"]["bagged"].get(n),
                  "bagged − routed": r["heldout"]["bagged"][n] - r["heldout"]["routed"][n]
                  if n in r["heldout"]["routed"] else None,
                  "role": "submitted" if n == r["chosen"] else ""}
                 for n, s in r["oof"].items() if n in r["heldout"]["routed"]]
        lines += [f"## {name}\n", f"{r['rows']} training rows, {r['heldout_rows']} held-out rows, {r['metric']}; "
                  f"{r['total_seconds'] / 60:.1f} min.\n", markdown(table),
                  "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items()) + ".\n",
                  "Seconds per Train run: " + ", ".join(f"{k} {v:.0f}" for k, v in r["train_run_seconds"].items()) + ".\n"]
        path = write_json(out / "test_rows.json", {"folds": args.folds, "epochs": args.epochs, "sets": results})
        write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")  # after each set: a late failure loses nothing
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
