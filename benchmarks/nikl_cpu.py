"""The whole pipeline on the real NIKL 2023 emotion data, on a CPU machine, in about 30 minutes.

    python benchmarks/nikl_cpu.py                          # reads ../shared/data/nikl_ea_2023
    python benchmarks/nikl_cpu.py --budget-minutes 30 --pretrain-share 0.35 --decoder-share 0.67
    python benchmarks/nikl_cpu.py --holdout-dev            # train on train.jsonl, score the submissions on dev.jsonl
    python benchmarks/nikl_cpu.py --no-pretrain --classical tfidf-lr     # the configuration before pretraining

Learns from train.jsonl + dev.jsonl (5 folds), predicts test.jsonl, with two tiny backbones of
two families (an ELECTRA encoder and a GPT-NeoX decoder, polyglot-ko's shape), each first
pretrained on the NIKL train+dev texts and the NSMC-style reviews beside them (never the NIKL
test file; masked LM for the encoder, causal LM for the decoder, packed blocks, a Ray Train
worker holding both cores), plus three classical members (TF-IDF + LR, NB-SVM, and logistic
regression on multilingual USE v3 sentence vectors), then the ensemble. `--budget-minutes` (30)
is divided: `--pretrain-share` of it (0.35) goes to pretraining, `--decoder-share` of that (0.67)
to the decoder's twin and the rest to the encoder's (the decoder's pays most per minute:
benchmarks/README.md); the folds, features and ensemble take the rest (they are not cut short:
the table says how long each stage took). `--no-pretrain` trains the two
backbones from random init instead.

Writes `benchmark.json` / `benchmark.md` beside the results: the cross-fitted out-of-fold
micro-F1 of every member and ensemble, which was submitted and by what score, a submission per
candidate (so each can be scored on test labels held elsewhere), time per stage, Ray's own
overhead per Train run (its wall time minus the time inside the training function) and the share
of the cluster's CPU-seconds spent inside training functions. With `--holdout-dev`, dev.jsonl is
the "test" file and its labels score every submission here: the check that the score the report
gives is the score the submission gets. All numbers come from this one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nikl_ray as nr  # noqa: E402
from nikl_ray.artifacts import load_manifest, read_json, write_json, write_text  # noqa: E402
from nikl_ray.cluster import cluster_shape  # noqa: E402
from nikl_ray.config import parse_experiment  # noqa: E402
from nikl_ray.data import read_rows  # noqa: E402
from nikl_ray.metrics import micro_f1  # noqa: E402
from nikl_ray.tables import markdown  # noqa: E402


def experiment(args, data: Path) -> dict:
    train = [str(data / "train.jsonl")] + ([] if args.holdout_dev else [str(data / "dev.jsonl")])
    backbones = [{"name": "electra-tiny", "checkpoint": "tiny:electra"}, {"name": "neox-tiny", "checkpoint": "tiny:gpt_neox"}]
    if args.pretrain_share:
        reviews = [str(p) for p in (data.parent / "nsmc_like").glob("ratings_*.txt")]
        minutes = args.budget_minutes * args.pretrain_share
        shares = {"electra-tiny": 1 - args.decoder_share, "neox-tiny": args.decoder_share}
        backbones = [{**b, "name": f"{b['name']}-pretrained", "pretrain": {
            "corpus": train + reviews, "minutes": minutes * shares[b["name"]], "batch_size": 64, "max_length": 64, "lr": 1e-3,
            # one worker with both cores: 5.6k tokens/s here against 4.7k for two single-core DDP workers
            "num_workers": 1, "cpus_per_worker": 2}} for b in backbones]
    return {
        "task": "nikl-emotion", "train": train, "test": str(data / ("dev.jsonl" if args.holdout_dev else "test.jsonl")),
        "results": args.results, "folds": {"k": args.folds, "seed": 42},
        "defaults": {"epochs": args.epochs, "batch_size": 32, "max_length": 64, "early_stopping_patience": 2, "lr": 1e-3,
                     "mode": "full", "target_encoding": args.target_encoding},
        "backbones": backbones, "classical": args.classical,
        "ensemble": {"hidden_sizes": [64, 128, 256], "inner_folds": 3, "epochs": 100, "patience": 10},
    }


def holdout_experiment(data_dir: str, results: str, folds: int, epochs: int, classical: list[str]) -> dict:
    """The `--holdout-dev --no-pretrain` experiment the other NIKL benchmarks build on (distill.py,
    test_rows.py): train.jsonl learns, dev.jsonl is the test file, random-init backbones."""
    args = parser().parse_args(["--holdout-dev", "--no-pretrain", "--data-dir", data_dir, "--results", results,
                                "--folds", str(folds), "--epochs", str(epochs), "--classical", *classical])
    return experiment(args, Path(data_dir))


def missing_data(data: Path, needs: str) -> bool:
    """True (and why, on stderr) when `data` lacks the NIKL file `needs`."""
    if (data / needs).exists():
        return False
    print(f"no NIKL data in {data} ({needs} is missing): pass --data-dir", file=sys.stderr)
    return True


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "nikl_ea_2023"))
    ap.add_argument("--results", default=str(REPO / "results" / "bench"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--target-encoding", default="inline", choices=["inline", "markers", "pair", "none"])
    ap.add_argument("--holdout-dev", action="store_true", help="train on train.jsonl only; dev.jsonl is the test file "
                                                               "and its labels score every submission")
    ap.add_argument("--budget-minutes", type=float, default=30.0, help="the run's time, divided as above (default 30)")
    ap.add_argument("--pretrain-share", type=float, default=0.35, help="share of the budget spent pretraining (0.35)")
    ap.add_argument("--decoder-share", type=float, default=0.67,
                    help="the decoder's share of the pretraining time (0.67; the encoder gets the rest)")
    ap.add_argument("--no-pretrain", dest="pretrain_share", action="store_const", const=0.0,
                    help="random-init backbones, no pretraining")
    # tfidf-wc-lr is left out: below tfidf-lr on NIKL and NSMC (benchmarks/classical_members.py)
    ap.add_argument("--classical", nargs="+", default=["tfidf-lr", "nbsvm", "use-lr"],
                    help="the classical members (default tfidf-lr, nbsvm and use-lr)")
    ap.add_argument("--num-cpus", type=int)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    data = Path(args.data_dir)
    if missing_data(data, "train.jsonl"):
        return 2
    from nikl_ray.cli import setup_logging

    setup_logging(0)
    started = time.time()
    run = nr.open_run(parse_experiment(experiment(args, data), REPO, "benchmark"))
    nr.connect(run, local=True, num_cpus=args.num_cpus)
    cpus = cluster_shape().cpus
    out = nr.pipeline(run)
    exp = run.exp
    report = read_json(exp.layout.report_json)

    runs = []
    for spec in exp.backbones:
        for fold in range(exp.folds.k):
            m = load_manifest(exp.layout.pair(spec.name, fold))
            runs.append({"backbone": spec.name, "fold": fold, "wall_s": m["wall_seconds"], "in_fn_s": m["train_fn_seconds"],
                         "ray_overhead_s": m["wall_seconds"] - m["train_fn_seconds"], "heldout_micro_f1": m["heldout_micro_f1"]})
    train_s = out["stage_seconds"]["train"]
    here = Path(args.results).resolve()
    submissions = {n: os.path.relpath(exp.layout.ensemble / rel, here) for n, rel in report["submissions"].items()}
    chosen = report["chosen"]
    result = {
        "data": str(data), "rows": report["rows"], "folds": exp.folds.k, "epochs": args.epochs, "cpus": cpus,
        "budget_minutes": args.budget_minutes, "pretrain_share": args.pretrain_share,
        "decoder_share": args.decoder_share, "classical": args.classical,
        "target_encoding": args.target_encoding, "holdout_dev": args.holdout_dev,
        "oof_micro_f1": report["crossfit_score"], "rule": report["best_rule"],
        "submitted": {"name": chosen["name"], "micro_f1": chosen["score"], "rule": chosen["rule"],
                      "path": submissions[chosen["name"]]},
        "submissions": submissions,
        "degenerate": report["degenerate"],
        "stage_seconds": out["stage_seconds"], "total_seconds": time.time() - started,
        "pretraining": {n: {k: m[k] for k in ("steps", "heldout_perplexity", "corpus")} for n in
                        [b.name for b in exp.backbones if b.pretrain] if (m := load_manifest(exp.layout.pretrain(n)))},
        "train_runs": runs,
        "ray_overhead_per_run_s": {"mean": sum(r["ray_overhead_s"] for r in runs) / len(runs),
                                   "min": min(r["ray_overhead_s"] for r in runs), "max": max(r["ray_overhead_s"] for r in runs),
                                   # what compares runs on a machine whose speed drifts: all runs' overhead
                                   # over all runs' time in their training functions
                                   "of_time_in_function": sum(r["ray_overhead_s"] for r in runs) / sum(r["in_fn_s"] for r in runs)},
        "share_of_cluster_cpu_seconds_in_training_functions":
            sum(r["in_fn_s"] * exp.resources.cpus_per_trial for r in runs) / (train_s * cpus),
    }
    if args.holdout_dev:  # every candidate's submission, scored on labels the run never saw
        truth = read_rows(data / "dev.jsonl", exp.task)
        result["holdout_micro_f1"] = {n: micro_f1(truth.labels, read_rows(here / p, exp.task).labels)
                                      for n, p in submissions.items()}
        result["holdout_micro_f1_other_test_rows"] = {  # the same candidates, test rows answered the other way
            n: micro_f1(truth.labels, read_rows(exp.layout.ensemble / p, exp.task).labels)
            for n, p in report.get("submissions_other_test_rows", {}).items()}
    path = write_json(here / "benchmark.json", result)
    table = [{"member / ensemble": n, "out-of-fold micro-F1 (cross-fitted)": s, "rule": report["best_rule"][n],
              "held-out dev micro-F1": result.get("holdout_micro_f1", {}).get(n),
              "… test rows the other way": result.get("holdout_micro_f1_other_test_rows", {}).get(n),
              "role": "submitted" if n == chosen["name"] else "candidate" if n in submissions else ""}
             for n, s in report["crossfit_score"].items()]
    o = result["ray_overhead_per_run_s"]
    pretrained = ", ".join(f"{n} {m['steps']} steps (held-out perplexity {m['heldout_perplexity']:.1f})"
                           for n, m in result["pretraining"].items()) or "none"
    lines = [f"# NIKL CPU benchmark\n\n{result['rows']} labelled rows, {exp.folds.k} folds, {args.epochs} epochs, {cpus:g} CPUs, "
             f"target encoding `{args.target_encoding}`, {result['total_seconds'] / 60:.1f} min in all "
             f"(budget {args.budget_minutes:g}, pretraining share {args.pretrain_share:g}, the decoder's "
             f"{args.decoder_share:g} of it: {pretrained}).\n", markdown(table),
             f"Submitted: **{chosen['name']}** (rule `{chosen['rule']}`, cross-fitted out-of-fold micro-F1 {chosen['score']:.4f}; "
             f"best single member {chosen['best_member']} {chosen['best_member_score']:.4f}) → {submissions[chosen['name']]}\n",
             markdown([{"stage": k, "seconds": v} for k, v in result["stage_seconds"].items()]),
             f"Ray overhead per Train run (wall − time in the training function): mean {o['mean']:.1f} s "
             f"(min {o['min']:.1f}, max {o['max']:.1f}) over {len(runs)} runs, in all "
             f"{o['of_time_in_function']:.1%} of the time they spent in the training function.",
             f"Share of the cluster's CPU-seconds inside training functions during the train stage: "
             f"{result['share_of_cluster_cpu_seconds_in_training_functions']:.1%}."]
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
