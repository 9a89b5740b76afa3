"""The tune stage: Ray Tune + Optuna over a backbone's hyper-parameters, on one fold.

    nikl-ray tune --config nikl_ray/examples/tiny.yaml --local --backbone neox-tiny-lora
    nikl-ray tune --config … --resume                  # continue an interrupted search
    ray job submit --working-dir . -- python ray_jobs/tune_backbone.py --config … --backbone …

Each trial is a function trial that builds and fits the same `TorchTrainer` the train stage
uses (the Ray Train V2 pattern), with Ray's `TuneReportCallback` passing every epoch's
held-out metrics to Tune. Optuna's TPE (seeded) proposes configs; ASHA stops poor trials
early. The search lives under `<results>/tune/<backbone>/`, so `Tuner.restore` resumes it;
the Optuna study is also kept in `optuna.db` (SQLite) for optuna-dashboard. The result is a
leaderboard and `best_config.yaml`, which every later stage applies to that backbone (values
the backbone sets itself in the experiment file still win).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml
from pydantic import ValidationError

from nikl_ray.artifacts import write_text
from nikl_ray.backbones import BackboneSpec
from nikl_ray.config import ConfigError, Experiment
from nikl_ray.data import Rows
from nikl_ray.train import METRIC, concurrent_slots, make_trainer, markdown_table, plan_placements, rows_payload

SEARCH_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
NOT_SEARCHABLE = {"name", "checkpoint", "family", "mode", "trust_remote_code", "params"}
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
TRIAL_CPU = 0.01  # what a function trial holds while it waits on its TorchTrainer
FINISHED = "finished_trials"  # folder of markers: one file per trial that ended by itself


def default_space_path(spec: BackboneSpec) -> Path:
    return SEARCH_SPACES / f"{spec.family}_{'full' if spec.mode == 'full' else 'lora'}.yaml"


def load_search_space(path: str | Path, base: BackboneSpec) -> dict:
    """A YAML search space as `ray.tune` distributions; every problem is reported at once."""
    from ray import tune

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"search space {path} not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of backbone field → distribution")
    space, problems = {}, []
    for key, dist in raw.items():
        if key not in BackboneSpec.model_fields or key in NOT_SEARCHABLE:
            problems.append(f"{key}: not a searchable backbone field")
            continue
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
            problems.append(f"{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: …}}, got {dist!r}")
            continue
        kind, arg = next(iter(dist.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                problems.append(f"{key}: choice needs a non-empty list")
                continue
            probe, space[key] = arg, tune.choice(arg)
        else:
            if not (isinstance(arg, dict) and set(arg) == {"low", "high"}):
                problems.append(f"{key}: {kind} needs {{low, high}}")
                continue
            low, high = arg["low"], arg["high"]
            if not low < high or (kind == "loguniform" and low <= 0):
                problems.append(f"{key}: {kind} range [{low}, {high}] is empty or not positive")
                continue
            probe = [low, high - 1] if kind == "randint" else [low, high]
            space[key] = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](low, high)
        for value in probe:  # every edge of the space must make a valid backbone
            try:
                BackboneSpec(**{**base.model_dump(), key: value})
            except ValidationError as e:
                problems.append(f"{key}: value {value!r} is invalid: {e.errors()[0]['msg']}")
    if problems:
        raise ConfigError(f"{path}: bad search space:\n  " + "\n  ".join(problems))
    return space


def tune_trial(config: dict, base: dict, ctx: dict, data) -> None:
    """A Tune function trial: fit one TorchTrainer with the sampled config on the tuning fold."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = BackboneSpec(**{**base, **config})
    loop_config = {"backbone": spec.model_dump(mode="json"), "task": ctx["task"], "data": data,
                   "held_out": ctx["held_out"], "gpu_share": ctx["gpu_share"]}
    trainer = make_trainer(loop_config, ctx["resources"], ctx["use_gpu"], ctx["storage"],
                           tune.get_context().get_trial_name(), ctx["max_failures"], callbacks=[TuneReportCallback()])
    trainer.fit()
    # Reached only when the run ended by itself (all epochs, or HF early stopping), never when
    # ASHA stopped the trial: the leaderboard tells the two apart by this file.
    # (Under the results root, not get_trial_dir(): that is a node-local working folder.)
    finished = Path(ctx["finished_dir"])
    finished.mkdir(parents=True, exist_ok=True)
    (finished / tune.get_context().get_trial_id()).write_text("finished\n")


def tune_stage(exp: Experiment, rows: Rows, folds: dict, backbone: str, *, num_samples: int = 8, fold: int = 0,
               resume: bool = False, grace_period: int = 1, prune_metric: str = METRIC, seed: int = 0,
               space_path: str | Path | None = None, max_concurrent: int | None = None) -> Path:
    """Search `backbone`'s space on one fold; write the leaderboard and best_config.yaml. Returns the latter."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from nikl_ray.cluster import cluster_resources, state_api_problem

    problem = state_api_problem()
    if problem:
        raise RuntimeError("tune needs Ray's state API, which the Ray dashboard serves: Ray Train frees the resources "
                           "of a trial stopped early only through it, else later trials wait for ever. Start Ray with "
                           f"its dashboard (nikl-ray --local does; `ray start --head` does by default). ({problem})")
    spec = exp.backbone(backbone)
    space_path = Path(space_path or exp.search_spaces.get(backbone) or default_space_path(spec))
    space = load_search_space(space_path, spec)
    out_dir = (exp.results / "tune" / backbone).resolve()
    cpus, gpus = cluster_resources()
    use_gpu = exp.resources.use_gpu if exp.resources.use_gpu is not None else gpus > 0
    plan = plan_placements(exp, use_gpu)[backbone]
    # A trial = the function trial (TRIAL_CPU) + its Train worker; together they hold exactly the
    # planned CPUs, else k trials on k CPUs need k·(1+TRIAL_CPU) and a queued worker can starve.
    worker_resources = {**plan.resources(), "CPU": max(plan.cpus - TRIAL_CPU, TRIAL_CPU)}
    ctx = {"task": exp.task.model_dump(mode="json"), "held_out": folds["folds"][fold], "gpu_share": plan.gpu_share,
           "resources": worker_resources, "use_gpu": use_gpu, "storage": str(out_dir / "train_runs"),
           "max_failures": exp.resources.max_failures, "finished_dir": str(out_dir / FINISHED)}
    # The function trial only waits on its TorchTrainer; the Train worker holds the real CPUs/GPUs.
    trainable = tune.with_resources(tune.with_parameters(tune_trial, base=spec.model_dump(mode="json"), ctx=ctx,
                                                         data=rows_payload(rows)), {"CPU": TRIAL_CPU})
    mode = "min" if "loss" in prune_metric else "max"
    experiment = out_dir / "search"
    if experiment.exists() and not resume:
        raise ConfigError(f"a search for {backbone} already exists at {experiment}: pass --resume to continue it, "
                          "or delete that folder to start over")
    if resume and tune.Tuner.can_restore(str(experiment)):
        print(f"tune {backbone}: resuming the search in {experiment}", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{out_dir / 'optuna.db'}")
        searcher = OptunaSearch(metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=seed),
                                storage=storage, study_name=backbone)
        # max_t one past the last epoch: at max_t ASHA would stop even a trial that ran every epoch
        scheduler = ASHAScheduler(metric=prune_metric, mode=mode, max_t=spec.epochs + 1, grace_period=grace_period,
                                  reduction_factor=2)
        slots = concurrent_slots([plan], cpus, gpus)
        if max_concurrent:  # fewer at once than fit: sequential trials make ASHA's decisions reproducible
            slots = min(slots, max_concurrent)
        print(f"tune {backbone}: {num_samples} trials over {sorted(space)} from {space_path}, {slots} at once", flush=True)
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                                       max_concurrent_trials=slots),
                           run_config=tune.RunConfig(name="search", storage_path=str(out_dir), verbose=1))
    results = tuner.fit()
    return write_leaderboard(out_dir, spec, list(space), results)


def write_leaderboard(out_dir: Path, spec: BackboneSpec, params: list[str], results) -> Path:
    board = []
    for r in results:
        df = r.metrics_dataframe
        has = df is not None and METRIC in df
        epochs = int(df["training_iteration"].max()) if has else 0
        max_epochs = int((r.config or {}).get("epochs", spec.epochs))
        if r.error:
            stopped = f"error: {type(r.error).__name__}"
        elif not (out_dir / FINISHED / str(r.metrics.get("trial_id"))).exists():
            stopped = "asha"
        else:
            stopped = "patience" if epochs < max_epochs else ""
        board.append({"trial": r.metrics.get("trial_id", Path(r.path).name) if r.metrics else Path(r.path).name,
                      **{p: (r.config or {}).get(p) for p in params},
                      "best_micro_f1": round(float(df[METRIC].max()), 4) if has else float("nan"), "epochs_run": epochs,
                      "stopped_early": stopped})
    board.sort(key=lambda b: -b["best_micro_f1"] if b["best_micro_f1"] == b["best_micro_f1"] else 1)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(board[0]))
    writer.writeheader()
    writer.writerows(board)
    write_text(out_dir / "leaderboard.csv", buf.getvalue())
    write_text(out_dir / "leaderboard.md", markdown_table(board))
    print(markdown_table(board), flush=True)
    best = next(b for b in board if b["best_micro_f1"] == b["best_micro_f1"])
    best_config = {p: best[p] for p in params}
    path = write_text(out_dir / "best_config.yaml",
                      f"# best of {len(board)} trials (held-out micro-F1 {best['best_micro_f1']}); applied by later stages\n"
                      + yaml.safe_dump(best_config, sort_keys=True))
    print(f"tune {spec.name}: best {best_config} → {path}", flush=True)
    return path
