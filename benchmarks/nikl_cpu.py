"""The whole pipeline on the real NIKL 2023 emotion data, on a CPU machine, in about 30 minutes.

    python benchmarks/nikl_cpu.py                          # reads ../shared/data/nikl_ea_2023
    python benchmarks/nikl_cpu.py --data-dir DIR --folds 5 --epochs 2 --results results/bench

Learns from train.jsonl + dev.jsonl (5 folds), predicts test.jsonl, with two tiny random-init
backbones of two families (an ELECTRA encoder and a GPT-NeoX decoder, polyglot-ko's shape)
plus the TF-IDF member, then the stacked ensemble. Writes `benchmark.json` / `benchmark.md`
beside the results: out-of-fold micro-F1 of every member, of probability averaging, of voting
and of the stack; time per stage; Ray's own overhead per Train run (its wall time minus the
time inside the training function, counted up to its last evaluation); and the share of the
cluster's CPU-seconds spent inside training functions. All numbers come from this one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nikl_ray.artifacts import load_manifest, write_json, write_text  # noqa: E402
from nikl_ray.cluster import cluster_resources, connect  # noqa: E402
from nikl_ray.config import parse_experiment  # noqa: E402
from nikl_ray.pipeline import run_pipeline  # noqa: E402
from nikl_ray.train import pair_dir  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "nikl_ea_2023"))
    ap.add_argument("--results", default=str(REPO / "results" / "bench"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--num-cpus", type=int)
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    if not (data / "train.jsonl").exists():
        print(f"no NIKL data in {data}: pass --data-dir", file=sys.stderr)
        return 2
    started = time.time()
    exp = parse_experiment({
        "task": "nikl-emotion", "train": [str(data / "train.jsonl"), str(data / "dev.jsonl")], "test": str(data / "test.jsonl"),
        "results": args.results, "folds": {"k": args.folds, "seed": 42},
        "defaults": {"epochs": args.epochs, "batch_size": 32, "max_length": 64, "early_stopping_patience": 2, "lr": 1e-3,
                     "mode": "full"},
        "backbones": [{"name": "electra-tiny", "checkpoint": "tiny:electra"},
                      {"name": "neox-tiny", "checkpoint": "tiny:gpt_neox"}],
        "ensemble": {"hidden_sizes": [64, 128, 256], "inner_folds": 3, "epochs": 100, "patience": 10},
    }, REPO, "benchmark")
    connect(local=True, num_cpus=args.num_cpus, dashboard=False)
    cpus, _ = cluster_resources()
    out = run_pipeline(exp)
    report = json.loads(Path(out["report"]).with_suffix(".json").read_text())

    runs = []
    for spec in exp.backbones:
        for fold in range(exp.folds.k):
            m = load_manifest(pair_dir(exp, spec.name, fold))
            runs.append({"backbone": spec.name, "fold": fold, "wall_s": m["wall_seconds"], "in_fn_s": m["train_fn_seconds"],
                         "ray_overhead_s": m["wall_seconds"] - m["train_fn_seconds"], "micro_f1": m["micro_f1"]})
    train_s = out["stage_seconds"]["train"]
    in_fn_cpu_s = sum(r["in_fn_s"] * exp.resources.cpus_per_trial for r in runs)
    best = lambda by_rule: max(v["micro_f1"] for v in by_rule.values())  # noqa: E731
    members = {m: best(report["table"][m]) for m in report["members"]}
    result = {
        "data": str(data), "rows": report["rows"], "folds": exp.folds.k, "epochs": args.epochs, "cpus": cpus,
        "oof_micro_f1": {**members, "prob-average": best(report["table"]["prob-average"]),
                         "majority-vote": best(report["table"]["majority-vote"]), "stack": report["stack_oof_scores"]["micro_f1"]},
        "stack_rule": report["chosen_rule"],
        "stack_minus_best_member": report["stack_oof_scores"]["micro_f1"] - max(members.values()),
        "stack_minus_prob_average": report["stack_oof_scores"]["micro_f1"] - best(report["table"]["prob-average"]),
        "stage_seconds": out["stage_seconds"], "total_seconds": time.time() - started,
        "train_runs": runs,
        "ray_overhead_per_run_s": {"mean": sum(r["ray_overhead_s"] for r in runs) / len(runs),
                                   "min": min(r["ray_overhead_s"] for r in runs), "max": max(r["ray_overhead_s"] for r in runs)},
        "share_of_cluster_cpu_seconds_in_training_functions": in_fn_cpu_s / (train_s * cpus),
        "submission": str(out["submission"]),
    }
    path = write_json(Path(args.results) / "benchmark.json", result)
    lines = [f"# NIKL CPU benchmark\n\n{result['rows']} labelled rows, {exp.folds.k} folds, {args.epochs} epochs, {cpus:g} CPUs, "
             f"{result['total_seconds'] / 60:.1f} min in all.\n", "| member / ensemble | out-of-fold micro-F1 |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["oof_micro_f1"].items()]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in result["stage_seconds"].items()]
    o = result["ray_overhead_per_run_s"]
    lines += ["", f"Ray overhead per Train run (wall − time in the training function): mean {o['mean']:.1f} s "
                  f"(min {o['min']:.1f}, max {o['max']:.1f}) over {len(runs)} runs.",
              f"Share of the cluster's CPU-seconds inside training functions during the train stage: "
              f"{result['share_of_cluster_cpu_seconds_in_training_functions']:.1%}.", f"Submission: {result['submission']}"]
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
