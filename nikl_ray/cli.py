"""`nikl-ray`: one command per stage, the same functions the ray jobs call.

    nikl-ray demo                                          # everything, on the shipped demo data
    nikl-ray pipeline --config my.yaml --local             # split → (pretrain) → (tune) → train → features → ensemble
    nikl-ray train --config my.yaml --local                # one stage
    nikl-ray status --config my.yaml                       # where a run stands (from another shell too)
    ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/pipeline.py --config my.yaml  # cluster

`--local` starts a Ray instance on this machine; without it we join the running cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent / "examples" / "tiny.yaml"
log = logging.getLogger("nikl_ray")


class _Format(logging.Formatter):
    """`HH:MM:SS message`; warnings and errors say so."""

    def format(self, record):
        prefix = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, '%H:%M:%S')} {prefix}{record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    root = logging.getLogger("nikl_ray")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _experiment(args):
    from nikl_ray.config import load_experiment

    overrides = {"results": args.results} if getattr(args, "results", None) else None
    return load_experiment(args.config, overrides)


def _connect(args, exp) -> None:
    from nikl_ray.cluster import check_shared_storage, connect, dashboard_url
    from nikl_ray.status import record_dashboard

    connect(local=args.local, num_cpus=getattr(args, "num_cpus", None), num_gpus=getattr(args, "num_gpus", None))
    check_shared_storage(exp.results)
    record_dashboard(exp.layout, dashboard_url())


def _prepared(args, *, tuned: bool = True):
    """What every stage command starts from: the experiment (tiny backbones built, tuned values
    applied unless `tuned` is False), its validated rows with their folds, and Ray."""
    from nikl_ray.config import apply_tuned, build_tiny
    from nikl_ray.inputs import load_inputs
    from nikl_ray.stages import split

    exp = _experiment(args)
    data = load_inputs(exp)
    split.run(exp, data.rows)
    _connect(args, exp)
    exp = build_tiny(exp)
    return (apply_tuned(exp) if tuned else exp), data


def cmd_validate(args) -> int:
    """Check the experiment and its data; write nothing."""
    from nikl_ray.inputs import load_inputs

    exp = _experiment(args)
    data = load_inputs(exp)
    print(f"ok: {len(data.rows)} labelled rows, {len(data.test) if data.test else 0} test rows, "
          f"{len(exp.backbones)} backbone(s): {', '.join(b.name for b in exp.backbones)}")
    return 0


def cmd_split(args) -> int:
    from nikl_ray.inputs import load_inputs
    from nikl_ray.stages import split

    exp = _experiment(args)
    folds = split.run(exp, load_inputs(exp).rows)
    print(f"folds: {exp.layout.folds} ({folds['k']} folds)")
    return 0


def cmd_plan(args) -> int:
    """The placement plan for this machine, or for `--gpus N` cards, without starting Ray."""
    from nikl_ray.config import build_tiny
    from nikl_ray.placement import Card, ClusterShape, format_plan, plan
    from nikl_ray.runspec import Device
    from nikl_ray.search_space import load_search_space, memory_corner

    exp = build_tiny(_experiment(args))
    cpus = args.cpus or float(__import__("os").cpu_count())
    if args.gpus is None:
        import torch

        n = torch.cuda.device_count()
        cards = [Card("local", torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / 1024**3,
                      True, torch.cuda.get_device_properties(i).major >= 8) for i in range(n)]
        shape = ClusterShape(cpus, float(n), tuple(cards))
    else:  # planning for cards this machine does not have: their size is the budget
        budget = args.card_gb or exp.resources.card_gb
        shape = ClusterShape(cpus, args.gpus, tuple(Card("planned", "planned card", budget, True, True)
                                                   for _ in range(int(args.gpus))))
    resources = exp.resources.model_copy(update={"card_gb": args.card_gb or exp.resources.card_gb})
    device = Device.resolve(exp.resources.use_gpu, shape.gpus, list(shape.cards))
    specs = list(exp.backbones)
    for spec in exp.backbones:  # a search is planned at the most memory-hungry corner of its space
        if spec.name in exp.search_spaces:
            corner = memory_corner(spec, load_search_space(exp.search_spaces[spec.name], spec))
            specs.append(corner.model_copy(update={"name": f"{spec.name} (search)"}))
    placements = plan(specs, resources, shape, device)
    print(format_plan(list(placements.values()), budget_gb=shape.budget_gb(resources.card_gb),
                      physical_gb=shape.physical_gb if args.gpus is None else None, total_cpus=cpus,
                      total_gpus=shape.gpus if device.schedule_gpu else 0))
    return 0


def cmd_make_backbones(args) -> int:
    from nikl_ray.data import read_rows
    from nikl_ray.tasks import get_task
    from nikl_ray.tiny import make_tiny_backbones

    rows = read_rows(args.data, get_task(args.task))
    for kind, path in make_tiny_backbones(rows.texts, args.out, kinds=args.kinds).items():
        print(f"{kind}: {path}")
    return 0


def cmd_pretrain(args) -> int:
    from nikl_ray.config import build_tiny
    from nikl_ray.stages import pretrain

    exp = _experiment(args)
    _connect(args, exp)
    for name, path in pretrain.run(build_tiny(exp), backbones=args.backbone).items():
        print(f"{name}: {path}")
    return 0


def cmd_train(args) -> int:
    from nikl_ray.stages import train

    exp, data = _prepared(args)
    print(f"train table: {train.run(exp, data, backbones=args.backbone)}")
    return 0


def cmd_tune(args) -> int:
    from nikl_ray.config import apply_tuned
    from nikl_ray.stages import tune

    exp, data = _prepared(args, tuned=False)  # a search starts from the experiment's own values
    flags = {k: getattr(args, k) for k in ("num_samples", "fold", "grace_period", "prune_metric", "seed", "max_concurrent")}
    exp = exp.model_copy(update={"search": exp.search.model_copy(update={k: v for k, v in flags.items() if v is not None})})
    for name in args.backbone or list(exp.search_spaces) or [b.name for b in exp.backbones]:
        tune.run(exp, data, name, space_path=args.space)
    apply_tuned(exp)  # logs what later stages will use
    return 0


def cmd_features(args) -> int:
    from nikl_ray.stages import features

    exp, data = _prepared(args)
    print(f"features: {features.run(exp, data)}")
    return 0


def cmd_ensemble(args) -> int:
    from nikl_ray.stages import ensemble

    exp, data = _prepared(args)
    print(f"report: {ensemble.run(exp, data)}")
    return 0


def cmd_pipeline(args) -> int:
    from nikl_ray.pipeline import run_pipeline

    exp = _experiment(args)
    _connect(args, exp)
    run_pipeline(exp, tune=args.tune)
    return 0


def cmd_demo(args) -> int:
    """The whole pipeline on the shipped demo data with tiny backbones, on this machine."""
    args.config, args.local, args.tune = str(EXAMPLE), True, False
    args.results = args.results or "results/demo"
    code = cmd_pipeline(args)
    flags = f"--config {EXAMPLE} --results {args.results}"
    print(f"\nNext, with the finished demo run:\n"
          f"  nikl-ray explain {flags} --text '오늘 경기 보고 진짜 너무 무서워'\n"
          f"  nikl-ray serve {flags} --local\n"
          f"  curl -s 127.0.0.1:8000/predict -H 'Content-Type: application/json' -d '{{\"text\": \"새 앨범 빨리 듣고 싶다\"}}'"
          f"      # while it serves, from another shell\n"
          f"  nikl-ray select {flags} --pool {EXAMPLE.parent.parent / 'demo_data' / 'test.jsonl'} --n 20")
    return code


def cmd_predict(args) -> int:
    from nikl_ray.config import prepare
    from nikl_ray.predictor import Predictor

    predictor = Predictor.load(prepare(_experiment(args)))
    probs, labels = predictor.predict_text(args.text, args.target)
    for name, p in probs.items():
        print(f"{name:<14} {p:.3f}{'  ✓' if name in labels else ''}")
    print(f"labels: {', '.join(labels) or '(none)'}   ({predictor.candidate}, rule {predictor.rule})")
    return 0


def cmd_explain(args) -> int:
    from nikl_ray.config import prepare
    from nikl_ray.explain import explain, write_html
    from nikl_ray.predictor import Predictor

    exp = prepare(_experiment(args))
    e = explain(Predictor.load(exp), args.text, args.target)
    for label in e.labels:
        print(f"{label:<14} {e.probs[label]:.3f}  {e.marked(label)}")
    if not e.labels:
        print("(no label predicted)")
    path = write_html(e, args.html or exp.layout.ensemble / "explain.html")
    print(f"highlights: {path}")
    return 0


def cmd_select(args) -> int:
    from nikl_ray.config import prepare
    from nikl_ray.data import read_rows
    from nikl_ray.predictor import Predictor
    from nikl_ray.select import rank, write_selection

    exp = prepare(_experiment(args))
    pool = read_rows(args.pool, exp.task, labelled=False)
    ranked = rank(Predictor.load(exp), pool, read_rows(exp.train, exp.task).texts, args.rarity_weight)
    suffix = ".txt" if exp.task.format == "tsv" else ".jsonl"
    path = write_selection(pool, ranked, args.n, args.out or exp.layout.root / "selection" / f"next_{args.n}{suffix}")
    for r in ranked[:5]:
        print(f"{r['score']:.3f} (uncertainty {r['uncertainty']:.2f}, rarity {r['rarity']:.2f})  {pool.texts[r['index']][:60]}")
    print(f"{min(args.n, len(ranked))} of {len(pool)} rows to label next: {path}")
    return 0


def cmd_serve(args) -> int:
    import time

    from nikl_ray.serve import deploy

    exp = _experiment(args)
    _connect(args, exp)
    url = deploy(args.config, exp.results, host=args.host, port=args.port, replicas=args.replicas)
    print(f"serving {exp.results} at {url}  (GET {url}/health, POST {url}/predict)")
    print(f"""  curl -s {url}/predict -H 'Content-Type: application/json' -d '{{"text": "오늘 영화 너무 좋다", "explain": true}}'""")
    if args.local:  # the local Ray instance lives as long as this process
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_status(args) -> int:
    from nikl_ray.status import print_status, run_status

    status = run_status(_experiment(args), ray_address=args.address)
    print_status(status, as_json=args.json)
    return 1 if status["failed"] else 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--results", help="results root (overrides the experiment's)")
    p.add_argument("--local", action="store_true", help="start a Ray instance on this machine instead of joining a cluster")
    p.add_argument("--num-cpus", type=int, help="with --local: CPUs Ray may use (default: all)")
    p.add_argument("--num-gpus", type=int, help="with --local: cards Ray offers (default: all). More than the machine "
                                                "has simulates them: placement and packing as on real cards (set "
                                                "resources.card_gb), the training on the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nikl-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log (debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, fn, help, common=True):
        p = sub.add_parser(name, help=help)
        if common:
            _add_common(p)
        p.set_defaults(fn=fn)
        return p

    command("validate", cmd_validate, "check an experiment file and its data; writes nothing")
    command("split", cmd_split, "make the stratified K-fold manifest (held-out and selection rows)")
    p = command("plan", cmd_plan, "print how trials share this machine's cards, or --gpus N cards (no Ray needed)", False)
    p.add_argument("--config", required=True)
    p.add_argument("--results", help="results root (overrides the experiment's)")
    p.add_argument("--gpus", type=float, help="plan for this many cards instead of this machine's (0: a CPU plan)")
    p.add_argument("--card-gb", type=float, help="with --gpus: memory budget per card (default: the experiment's card_gb)")
    p.add_argument("--cpus", type=float, help="CPUs to plan for (default: this machine's)")
    p = command("make-backbones", cmd_make_backbones, "build tiny random-init HF backbones with a tokenizer trained on "
                                                        "the task's text", False)
    p.add_argument("--task", default="nikl-emotion")
    p.add_argument("--data", nargs="+", default=[str(Path(__file__).parent / "demo_data" / "train.jsonl")])
    p.add_argument("--out", required=True)
    p.add_argument("--kinds", nargs="+", default=["electra", "roberta", "gpt_neox", "llama"])
    p = command("pretrain", cmd_pretrain, "continue pretraining backbones on unlabeled text (their `pretrain:`), "
                                          "on several Ray Train workers")
    p.add_argument("--backbone", action="append", help="only this backbone (repeatable)")
    p = command("train", cmd_train, "train every fold × backbone as Ray Train runs")
    p.add_argument("--backbone", action="append", help="only this backbone (repeatable)")
    p = command("tune", cmd_tune, "Ray Tune + Optuna search per backbone; leaderboard and best_config.yaml "
                                  "(a finished search is skipped, a cut-off one resumed)")
    p.add_argument("--backbone", action="append", help="backbone to tune (repeatable; default: those with a search space)")
    p.add_argument("--space", help="search space YAML (default: the experiment's, else search_spaces/<family>_<mode>.yaml)")
    # each flag overrides the experiment's `search:` section (config.SearchConfig documents them)
    p.add_argument("--num-samples", type=int, help="trials per backbone (default 8)")
    p.add_argument("--fold", type=int, help="the fold whose selection slice scores the trials (default 0)")
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial may be stopped (default 1)")
    p.add_argument("--prune-metric", help="what ASHA compares (default: the selection score eval_score; or eval_loss)")
    p.add_argument("--seed", type=int, help="TPE sampler seed (default 0)")
    p.add_argument("--max-concurrent", type=int, help="run at most this many trials at once (default: all that fit)")
    command("features", cmd_features, "out-of-fold and test features of every fold model")
    command("ensemble", cmd_ensemble, "train the stacked heads, compare every candidate, write report and submissions")
    p = command("pipeline", cmd_pipeline, "split → (pretrain) → (tune) → train → features → ensemble → submit, "
                                          "skipping finished stages")
    p.add_argument("--tune", action="store_true", help="search hyper-parameters first for backbones with a search space")
    p = command("demo", cmd_demo, "the whole pipeline on the shipped demo data with tiny backbones (CPU, minutes)", False)
    p.add_argument("--results", help="results root (default results/demo)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    p = command("predict", cmd_predict, "labels for one sentence from a finished run", False)
    p.add_argument("--config", required=True)
    p.add_argument("--results", help="results root (overrides the experiment's)")
    p.add_argument("--text", required=True)
    p.add_argument("--target", help="the target span (NIKL); leave out for the whole text")
    p = command("explain", cmd_explain, "which words made a finished run give its labels (text marks and an HTML file)",
                False)
    p.add_argument("--config", required=True)
    p.add_argument("--results", help="results root (overrides the experiment's)")
    p.add_argument("--text", required=True)
    p.add_argument("--target", help="the target span (NIKL)")
    p.add_argument("--html", help="where to write the shaded text (default <results>/ensemble/explain.html)")
    p = command("select", cmd_select, "rank unlabeled rows for labelling by the run's uncertainty and their rarity", False)
    p.add_argument("--config", required=True)
    p.add_argument("--results", help="results root (overrides the experiment's)")
    p.add_argument("--pool", required=True, nargs="+", help="unlabeled rows in the task's format")
    p.add_argument("--n", type=int, default=200, help="how many to pick")
    p.add_argument("--rarity-weight", type=float, default=0.5, help="score = uncertainty + weight × rarity")
    p.add_argument("--out", help="where to write them (default <results>/selection/next_<n>.jsonl|.txt)")
    p = command("serve", cmd_serve, "serve a finished run on Ray Serve (POST /predict, GET /health)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p = command("status", cmd_status, "where a run stands: stages, runs, trials (works while it runs and after); "
                                      "exit 1 when something failed", False)
    p.add_argument("--config", required=True)
    p.add_argument("--results", help="results root (overrides the experiment's)")
    p.add_argument("--address", help="Ray dashboard to ask about live runs (default: the one this results root's "
                                     "run recorded, else none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    from nikl_ray.cluster import StorageError
    from nikl_ray.config import ConfigError
    from nikl_ray.data import DataError
    from nikl_ray.placement import PlacementError

    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        return args.fn(args)
    except (ConfigError, DataError, PlacementError, StorageError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
