"""`nikl-ray`: one command per stage, the same functions the ray jobs call.

    nikl-ray demo                                          # everything, on the shipped demo data
    nikl-ray pipeline --config my.yaml --local             # split → tune → train → features → ensemble → submit
    nikl-ray train --config my.yaml --local                # one stage
    ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/pipeline.py --config my.yaml  # cluster

`--local` starts a Ray instance on this machine; without it we join the running cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent / "examples" / "tiny.yaml"


def _experiment(args):
    from nikl_ray.config import load_experiment

    overrides = {"results": args.results} if getattr(args, "results", None) else None
    return load_experiment(args.config, overrides)


def _connect(args) -> None:
    from nikl_ray.cluster import connect

    connect(local=args.local, num_cpus=getattr(args, "num_cpus", None))


def cmd_validate(args) -> int:
    from nikl_ray.pipeline import load_inputs

    exp = _experiment(args)
    rows, test = load_inputs(exp)
    print(f"ok: {len(rows)} labelled rows, {len(test) if test else 0} test rows, "
          f"{len(exp.backbones)} backbone(s): {', '.join(b.name for b in exp.backbones)}")
    return 0


def _prepared(args, *, ray: bool = True):
    """What every stage command starts from: the experiment, validated rows, folds, and Ray."""
    from nikl_ray.folds import split_stage
    from nikl_ray.pipeline import load_inputs

    exp = _experiment(args)
    rows, test = load_inputs(exp)
    folds = split_stage(exp, rows)
    if ray:
        _connect(args)
    return exp, rows, test, folds


def cmd_split(args) -> int:
    _prepared(args, ray=False)
    return 0


def cmd_plan(args) -> int:
    """The placement plan for a cluster of this shape, without starting Ray."""
    from nikl_ray.placement import format_plan
    from nikl_ray.train import plan_placements

    exp = _experiment(args)
    use_gpu = args.gpus > 0
    plans = plan_placements(exp, use_gpu)
    print(format_plan(list(plans.values()), card_gb=exp.resources.card_gb, total_cpus=args.cpus, total_gpus=args.gpus))
    return 0


def cmd_make_backbones(args) -> int:
    from nikl_ray.data import read_rows
    from nikl_ray.tasks import get_task
    from nikl_ray.tiny import make_tiny_backbones

    rows = read_rows(args.data, get_task(args.task))
    for kind, path in make_tiny_backbones(rows.texts, args.out, kinds=args.kinds).items():
        print(f"{kind}: {path}")
    return 0


def cmd_train(args) -> int:
    from nikl_ray.train import train_stage

    exp, rows, _, folds = _prepared(args)
    print(f"summary: {train_stage(exp, rows, folds, backbones=args.backbone)}")
    return 0


def cmd_tune(args) -> int:
    from nikl_ray.tune import tune_stage

    exp, rows, _, folds = _prepared(args)
    for name in args.backbone or list(exp.search_spaces) or [b.name for b in exp.backbones]:
        tune_stage(exp, rows, folds, name, num_samples=args.num_samples, fold=args.fold, resume=args.resume,
                   grace_period=args.grace_period, prune_metric=args.prune_metric, seed=args.seed, space_path=args.space,
                   max_concurrent=args.max_concurrent)
    return 0


def cmd_features(args) -> int:
    from nikl_ray.features import features_stage

    exp, rows, test, folds = _prepared(args)
    print(f"features: {features_stage(exp, rows, folds, test)}")
    return 0


def cmd_ensemble(args) -> int:
    from nikl_ray.ensemble import ensemble_stage

    exp, rows, test, folds = _prepared(args)
    print(f"report: {ensemble_stage(exp, rows, folds, test)}")
    return 0


def cmd_pipeline(args) -> int:
    from nikl_ray.pipeline import run_pipeline

    exp = _experiment(args)
    _connect(args)
    run_pipeline(exp, tune=args.tune)
    return 0


def cmd_demo(args) -> int:
    """The whole pipeline on the shipped demo data with tiny backbones, on this machine."""
    args.config, args.local, args.tune = str(EXAMPLE), True, False
    args.results = args.results or "results/demo"
    return cmd_pipeline(args)


def cmd_predict(args) -> int:
    from nikl_ray.predict import predict_text

    exp = _experiment(args)
    probs, labels = predict_text(exp, args.text, args.target)
    for name, p in probs.items():
        print(f"{name:<14} {p:.3f}{'  ✓' if name in labels else ''}")
    print("labels:", ", ".join(labels) or "(none)")
    return 0


def _add_common(p: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, default=None if config_required else str(EXAMPLE),
                   help="experiment YAML")
    p.add_argument("--results", help="results root (overrides the experiment's)")
    p.add_argument("--local", action="store_true", help="start a Ray instance on this machine instead of joining a cluster")
    p.add_argument("--num-cpus", type=int, help="with --local: CPUs Ray may use (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nikl-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check an experiment file and its data, train nothing")
    _add_common(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("split", help="make the stratified K-fold manifest")
    _add_common(p)
    p.set_defaults(fn=cmd_split)

    p = sub.add_parser("plan", help="print how many trials of each backbone share a card (no Ray needed)")
    p.add_argument("--config", required=True)
    p.add_argument("--results", help="results root (overrides the experiment's)")
    p.add_argument("--gpus", type=float, default=1, help="GPUs in the cluster (0: a CPU plan)")
    p.add_argument("--cpus", type=float, default=16, help="CPUs in the cluster")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("make-backbones", help="build tiny random-init HF backbones with a tokenizer trained on the task's text")
    p.add_argument("--task", default="nikl-emotion")
    p.add_argument("--data", nargs="+", default=[str(Path(__file__).parent / "demo_data" / "train.jsonl")])
    p.add_argument("--out", required=True)
    p.add_argument("--kinds", nargs="+", default=["electra", "roberta", "gpt_neox", "llama"])
    p.set_defaults(fn=cmd_make_backbones)

    p = sub.add_parser("train", help="train every fold × backbone as Ray Train runs")
    _add_common(p)
    p.add_argument("--backbone", action="append", help="only this backbone (repeatable)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune + Optuna search per backbone; writes leaderboard and best_config.yaml")
    _add_common(p)
    p.add_argument("--backbone", action="append", help="backbone to tune (repeatable; default: those with a search space)")
    p.add_argument("--space", help="search space YAML (default: the experiment's, else search_spaces/<family>_<mode>.yaml)")
    p.add_argument("--num-samples", type=int, default=8, help="trials per backbone")
    p.add_argument("--fold", type=int, default=0, help="the fold whose held-out rows score the trials")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    p.add_argument("--prune-metric", default="eval_micro_f1", help="what ASHA compares (eval_micro_f1 or eval_loss)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--max-concurrent", type=int, help="run at most this many trials at once (default: all that fit)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("features", help="out-of-fold and test features of every fold model")
    _add_common(p)
    p.set_defaults(fn=cmd_features)

    p = sub.add_parser("ensemble", help="train the stacked MLP heads, compare ensembles, write report and submission")
    _add_common(p)
    p.set_defaults(fn=cmd_ensemble)

    p = sub.add_parser("pipeline", help="split → (tune) → train → features → ensemble → submit, skipping finished stages")
    _add_common(p)
    p.add_argument("--tune", action="store_true", help="search hyper-parameters first for backbones with a search space")
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("demo", help="the whole pipeline on the shipped demo data with tiny backbones (CPU, minutes)")
    p.add_argument("--results", help="results root (default results/demo)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("predict", help="labels for one sentence from a finished run")
    _add_common(p)
    p.add_argument("--text", required=True)
    p.add_argument("--target", help="the target span (NIKL); leave out for the whole text")
    p.set_defaults(fn=cmd_predict)

    return parser


def main(argv: list[str] | None = None) -> int:
    from nikl_ray.config import ConfigError
    from nikl_ray.data import DataError
    from nikl_ray.folds import FoldMismatchError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, FoldMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
