"""`nikl-ray`: one command per stage, the same functions (nikl_ray.api) the ray jobs call.

    nikl-ray demo                                          # everything, on the shipped demo data
    nikl-ray pipeline --config my.yaml --local             # split → (pretrain) → (tune) → train → features → ensemble
    nikl-ray train --config my.yaml --local                # one stage
    nikl-ray status --config my.yaml                       # where a run stands (from another shell too)
    nikl-ray predict --results results/nikl --text "…"     # a finished run needs only its results folder
    ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/pipeline.py --config my.yaml  # cluster

`--local` starts a Ray instance on this machine; without it we join the running cluster.
Every command opens its run through `nikl_ray.open_run`, as a Python program would.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent / "examples" / "tiny.yaml"
QA_EXAMPLE = Path(__file__).parent / "examples" / "qa_tiny.yaml"
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


def _run(args, *, build: bool = True):
    """The run a command works on (nikl_ray.run.open_run), and Ray when the command has Ray flags."""
    from nikl_ray.run import connect, open_run

    if not (args.config or args.results):
        raise SystemExit("give --config (an experiment YAML) or --results (the root of a run opened before)")
    run = open_run(args.config, args.results, build=False)
    if hasattr(args, "local"):  # before anything is written: a results root some node cannot see is refused
        connect(run, local=args.local, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    return run.build() if build else run


def _finished(args):
    """The finished run a command answers with: `--results DIR` alone, or the results root `--config` names."""
    from nikl_ray.config import load_experiment
    from nikl_ray.predictor import Predictor

    if not (args.results or args.config):
        raise SystemExit("give --results DIR (a finished run's results root) or --config")
    return Predictor.load(args.results or load_experiment(args.config).results, student=getattr(args, "student", None))


def _classifier(args):
    """A finished classify run (explain and select read labels' probabilities)."""
    predictor = _finished(args)
    if predictor.task.generates:
        raise SystemExit(f"{args.command} is for classify runs; task {predictor.task.name} generates answers")
    return predictor


def cmd_validate(args) -> int:
    """Check the experiment and its data; write nothing."""
    run = _run(args, build=False)
    test = run.inputs.test
    print(f"ok: {len(run.inputs.rows)} labelled rows, {len(test) if test else 0} test rows, "
          f"{len(run.config.backbones)} backbone(s): {', '.join(b.name for b in run.config.backbones)}")
    return 0


def cmd_split(args) -> int:
    run = _run(args)
    print(f"folds: {run.layout.folds} ({run.folds['k']} folds)")
    return 0


def cmd_plan(args) -> int:
    """The placement plan for this machine, or for `--gpus N` cards, without starting Ray."""
    import os

    from nikl_ray.placement import Card, ClusterShape, format_plan, plan
    from nikl_ray.runspec import Device
    from nikl_ray.search_space import load_search_space, memory_corner

    exp = _run(args).exp
    cpus = args.cpus or float(os.cpu_count())
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
    from nikl_ray.api import pretrain

    for name, path in pretrain(_run(args), backbones=args.backbone).items():
        print(f"{name}: {path}")
    return 0


def cmd_train(args) -> int:
    from nikl_ray.api import train

    print(f"train table: {train(_run(args), backbones=args.backbone)}")
    return 0


def cmd_tune(args) -> int:
    from nikl_ray.api import to_tune, tune

    run = _run(args)
    flags = {k: getattr(args, k) for k in ("num_samples", "fold", "grace_period", "prune_metric", "seed", "max_concurrent")}
    for name in to_tune(run, args.backbone):
        tune(run, name, space=args.space, **flags)
    run.exp  # noqa: B018 - logs the tuned values later stages will use
    return 0


def cmd_features(args) -> int:
    from nikl_ray.api import features

    print(f"features: {features(_run(args))}")
    return 0


def cmd_ensemble(args) -> int:
    from nikl_ray.api import ensemble

    print(f"report: {ensemble(_run(args))}")
    return 0


def cmd_distill(args) -> int:
    from nikl_ray.api import distill

    print(f"student report: {distill(_run(args), student=args.student, pool=args.pool)}")
    return 0


def cmd_pipeline(args) -> int:
    from nikl_ray.api import pipeline

    pipeline(_run(args), tune_first=args.tune)
    return 0


def cmd_demo(args) -> int:
    """The whole pipeline on the shipped demo data with tiny backbones, on this machine."""
    args.config, args.local, args.tune, args.num_gpus = str(QA_EXAMPLE if args.qa else EXAMPLE), True, False, None
    args.results = args.results or ("results/qa-demo" if args.qa else "results/demo")
    code = cmd_pipeline(args)
    results = f"--results {args.results}"
    if args.qa:
        print(f"\nNext, with the finished QA demo run:\n"
              f"  nikl-ray predict {results} --text '벽지 들뜸은 왜 생기나요?'\n"
              f"  nikl-ray serve {results} --local\n"
              f"  curl -s 127.0.0.1:8000/generate -H 'Content-Type: application/json' -d '{{\"question\": \"곰팡이를 예방하려면?\"}}'"
              f"      # while it serves, from another shell")
        return code
    print(f"\nNext, with the finished demo run:\n"
          f"  nikl-ray explain {results} --text '오늘 경기 보고 진짜 너무 무서워'\n"
          f"  nikl-ray serve {results} --local\n"
          f"  curl -s 127.0.0.1:8000/predict -H 'Content-Type: application/json' -d '{{\"text\": \"새 앨범 빨리 듣고 싶다\"}}'"
          f"      # while it serves, from another shell\n"
          f"  nikl-ray select {results} --pool {EXAMPLE.parent.parent / 'demo_data' / 'test.jsonl'} --n 20")
    return code


def cmd_predict(args) -> int:
    import json

    predictor = _finished(args)
    if predictor.task.generates:
        answer = predictor.generate([args.text], [args.context], candidate=args.candidate)[0]
        if args.json:
            print(json.dumps(answer, ensure_ascii=False))
        else:
            for c in answer["candidates"]:
                print(f"{c['member']:<16} {c['answer']}")
            print(f"answer: {answer['answer']}   ({answer['candidate']}, from {answer['member']})")
        return 0
    answer = predictor.answer(predictor.rows_of([args.text], [args.target]), candidate=args.candidate)[0]
    if args.json:
        print(json.dumps(answer, ensure_ascii=False))
        return 0
    for name, p in answer["probabilities"].items():
        print(f"{name:<14} {p:.3f}{'  ✓' if name in answer['labels'] else ''}")
    print(f"labels: {', '.join(answer['labels']) or '(none)'}   ({answer['candidate']}, rule {answer['rule']})")
    return 0


def cmd_explain(args) -> int:
    from nikl_ray.explain import explain, write_html

    predictor = _classifier(args)
    e = explain(predictor, args.text, args.target)
    for label in e.labels:
        print(f"{label:<14} {e.probs[label]:.3f}  {e.marked(label)}")
    if not e.labels:
        print("(no label predicted)")
    path = write_html(e, args.html or predictor.layout.explanation)
    print(f"highlights: {path}")
    return 0


def cmd_select(args) -> int:
    from nikl_ray.data import read_rows
    from nikl_ray.select import rank, write_selection

    predictor = _classifier(args)
    pool = read_rows(args.pool, predictor.task, labelled=False)
    ranked = rank(predictor, pool, args.rarity_weight)
    path = write_selection(pool, ranked, args.n, args.out or predictor.layout.selection(f"next_{args.n}{predictor.task.suffix}"))
    for r in ranked[:5]:
        print(f"{r['score']:.3f} (uncertainty {r['uncertainty']:.2f}, rarity {r['rarity']:.2f})  {pool.texts[r['index']][:60]}")
    print(f"{min(args.n, len(ranked))} of {len(pool)} rows to label next: {path}")
    return 0


def cmd_serve(args) -> int:
    from nikl_ray.run import connect
    from nikl_ray.serve import serve_run

    if args.chain:  # fails here, before Ray starts, when the runs are not finished or do not compose
        from nikl_ray.chain import Chain

        Chain.load(*args.chain, student=args.student)
        results = None
    else:
        results = _finished(args).layout.root
    connect(local=args.local, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    serve_run(results, host=args.host, port=args.port, replicas=args.replicas, student=args.student,
              chain=args.chain, block=args.local)
    return 0


def serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="copies of the deployment (default 1)")
    p.add_argument("--chain", nargs=2, metavar=("KEYWORD_RESULTS", "SENTIMENT_RESULTS"),
                   help="serve a keyword run and a sentiment run of (review, keyword) pairs as one endpoint "
                        "(each predicted keyword with its sentiment) instead of --results")


def cmd_status(args) -> int:
    from nikl_ray.status import print_status, run_status

    status = run_status(_run(args, build=False).config, ray_address=args.address)
    print_status(status, as_json=args.json)
    return 1 if status["failed"] else 0


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (without it: the run --results holds, as it was opened)")
    p.add_argument("--results", help="results root (overrides the experiment's)")


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true", help="start a Ray instance on this machine instead of joining a cluster")
    p.add_argument("--num-cpus", type=int, help="with --local: CPUs Ray may use (default: all)")
    p.add_argument("--num-gpus", type=int, help="with --local: cards Ray offers (default: all). More than the machine "
                                                "has simulates them: placement and packing as on real cards (set "
                                                "resources.card_gb), the training on the CPU")


def _add_finished(p: argparse.ArgumentParser) -> None:
    from nikl_ray.export import FORMS

    p.add_argument("--results", help="a finished run's results root (all that is needed)")
    p.add_argument("--config", help="or the experiment YAML whose results root holds the finished run")
    p.add_argument("--student", nargs="?", const="fp32", choices=FORMS,
                   help="answer with the run's distilled student alone (`nikl-ray distill`): fp32 (the default), "
                        "or its int8 or ONNX form, run with onnxruntime")


def build_parser() -> argparse.ArgumentParser:
    from nikl_ray import __version__

    parser = argparse.ArgumentParser(prog="nikl-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nikl-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log (debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, fn, help, *parts):
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        for part in parts:
            part(p)
        p.set_defaults(fn=fn)
        return p

    command("validate", cmd_validate, "check an experiment file and its data; writes nothing", _add_run)
    command("split", cmd_split, "make the stratified K-fold manifest (held-out and selection rows)", _add_run)
    p = command("plan", cmd_plan, "print how trials share this machine's cards, or --gpus N cards (no Ray needed)",
                _add_run)
    p.add_argument("--gpus", type=float, help="plan for this many cards instead of this machine's (0: a CPU plan)")
    p.add_argument("--card-gb", type=float, help="with --gpus: memory budget per card (default: the experiment's card_gb)")
    p.add_argument("--cpus", type=float, help="CPUs to plan for (default: this machine's)")
    p = command("make-backbones", cmd_make_backbones, "build tiny random-init HF backbones with a tokenizer trained on "
                                                        "the task's text")
    p.add_argument("--task", default="nikl-emotion", help="the task whose text trains the tokenizer")
    p.add_argument("--data", nargs="+", default=[str(Path(__file__).parent / "demo_data" / "train.jsonl")],
                   help="its data files (default: the demo data)")
    p.add_argument("--out", required=True, help="folder to write one checkpoint per kind into")
    p.add_argument("--kinds", nargs="+", default=["electra", "roberta", "gpt_neox", "llama"], help="which kinds")
    p = command("pretrain", cmd_pretrain, "continue pretraining backbones on unlabeled text (their `pretrain:`), "
                                          "on several Ray Train workers", _add_run, _add_ray)
    p.add_argument("--backbone", action="append", help="only this backbone (repeatable)")
    p = command("train", cmd_train, "train every fold × backbone as Ray Train runs", _add_run, _add_ray)
    p.add_argument("--backbone", action="append", help="only this backbone (repeatable)")
    p = command("tune", cmd_tune, "Ray Tune + Optuna search per backbone; leaderboard and best_config.yaml "
                                  "(a finished search is skipped, a cut-off one resumed)", _add_run, _add_ray)
    p.add_argument("--backbone", action="append", help="backbone to tune (repeatable; default: those with a search space)")
    p.add_argument("--space", help="search space YAML (default: the experiment's, else search_spaces/<family>_<mode>.yaml)")
    # each flag overrides the experiment's `search:` section (config.SearchConfig documents them)
    p.add_argument("--num-samples", type=int, help="trials per backbone (default 8)")
    p.add_argument("--fold", type=int, help="the fold whose selection slice scores the trials (default 0)")
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial may be stopped (default 1)")
    p.add_argument("--prune-metric", help="what ASHA compares (default: the selection score eval_score; or eval_loss)")
    p.add_argument("--seed", type=int, help="TPE sampler seed (default 0)")
    p.add_argument("--max-concurrent", type=int, help="run at most this many trials at once (default: all that fit)")
    command("features", cmd_features, "out-of-fold and test features of every fold model", _add_run, _add_ray)
    command("ensemble", cmd_ensemble, "train the stacked heads, compare every candidate, write report and submissions",
            _add_run, _add_ray)
    p = command("distill", cmd_distill, "train one student on the finished ensemble's probabilities (Ray Train), "
                "score it out of fold beside the ensemble, export it for CPU (ONNX, int8)", _add_run, _add_ray)
    p.add_argument("--student", help="the backbone the student starts from (default: the experiment's distill.student, "
                                     "else its first encoder)")
    p.add_argument("--pool", nargs="+", help="unlabelled rows in the task's format the ensemble labels for the student "
                                             "(default: the experiment's distill.pool)")
    p = command("pipeline", cmd_pipeline, "split → (pretrain) → (tune) → train → features → ensemble → submit, "
                                          "skipping finished stages", _add_run, _add_ray)
    p.add_argument("--tune", action="store_true", help="search hyper-parameters first for backbones with a search space")
    p = command("demo", cmd_demo, "the whole pipeline on the shipped demo data with tiny backbones (CPU, minutes)")
    p.add_argument("--qa", action="store_true", help="the generative-QA demo (nikl_ray/examples/qa_tiny.yaml)")
    p.add_argument("--results", help="results root (default results/demo, results/qa-demo with --qa)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    p = command("predict", cmd_predict, "labels for one sentence (or a generate run's answer to one question) from a "
                                        "finished run", _add_finished)
    p.add_argument("--text", required=True, help="the sentence (a generate run: the question)")
    p.add_argument("--target", help="the target span (NIKL); leave out for the whole text")
    p.add_argument("--context", help="a generate run: the passage to answer from (tasks with a context field)")
    p.add_argument("--candidate", help="answer with this candidate (default: the submitted one; see the report)")
    p.add_argument("--json", action="store_true", help="print the answer as `serve` returns it")
    p = command("explain", cmd_explain, "which words made a finished run give its labels (text marks and an HTML file)",
                _add_finished)
    p.add_argument("--text", required=True, help="the sentence")
    p.add_argument("--target", help="the target span (NIKL)")
    p.add_argument("--html", help="where to write the shaded text (default <results>/ensemble/explain.html)")
    p = command("select", cmd_select, "rank unlabeled rows for labelling by the run's uncertainty and their rarity",
                _add_finished)
    p.add_argument("--pool", required=True, nargs="+", help="unlabeled rows in the task's format")
    p.add_argument("--n", type=int, default=200, help="how many to pick")
    p.add_argument("--rarity-weight", type=float, default=0.5, help="score = uncertainty + weight × rarity")
    p.add_argument("--out", help="where to write them (default <results>/selection/next_<n>.jsonl|.txt)")
    command("serve", cmd_serve, "serve a finished run on Ray Serve (POST /predict, GET /health)", _add_finished,
            _add_ray, serve_options)
    p = command("status", cmd_status, "where a run stands: stages, runs, trials (works while it runs and after); "
                                      "exit 1 when something failed", _add_run)
    p.add_argument("--address", help="Ray dashboard to ask about live runs (default: the one this results root's "
                                     "run recorded, else none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _exit_code(fn, args) -> int:
    """fn(args)'s exit code; a bad experiment, bad data or a plan that cannot fit: its reason and 2."""
    from nikl_ray.cluster import StorageError
    from nikl_ray.config import ConfigError
    from nikl_ray.data import DataError
    from nikl_ray.placement import PlacementError
    from nikl_ray.chain import ChainError
    from nikl_ray.export import ExportError
    from nikl_ray.predictor import BadRequest

    try:
        return fn(args)
    except (ConfigError, DataError, PlacementError, StorageError, FileNotFoundError, BadRequest, ChainError,
            ExportError) as e:
        log.error("%s", e)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before any heavy import: `--help` answers at once
    setup_logging(-1 if args.quiet else args.verbose)
    return _exit_code(args.fn, args)


def job(doc: str, body, *, options=None, finished: bool = False, argv: list[str] | None = None) -> int:
    """A ray job (ray_jobs/*.py): its arguments (--config, --results, Ray's flags and `options(parser)`'s),
    its run opened and Ray connected, then `body(run, args)`; the exit code. A job on a `finished` run
    gets `body(predictor, args)` instead, and connects Ray itself."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    (_add_finished if finished else _add_run)(parser)
    _add_ray(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log (debug)")
    if options:
        options(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def opened(args) -> int:
        if finished:
            body(_finished(args), args)
            return 0
        body(_run(args), args)
        return 0

    return _exit_code(opened, args)


if __name__ == "__main__":
    sys.exit(main())
