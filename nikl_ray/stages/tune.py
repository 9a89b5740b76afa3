"""The tune stage: Ray Tune + Optuna over a backbone's hyper-parameters, on one fold.

    nikl-ray tune --config nikl_ray/examples/tiny.yaml --local --backbone neox-tiny-lora
    ray job submit --working-dir . -- python ray_jobs/tune_backbone.py --config … --backbone …

Each trial is a function trial that fits the same Ray Train run the train stage uses
(launcher.make_trainer, the Ray Train V2 pattern), with Ray's `TuneReportCallback` passing every
epoch's score to Tune. A trial trains on the fold's training rows and is scored on the fold's
*selection slice*, never on its held-out rows. Optuna's TPE (seeded) proposes configs; ASHA
stops poor trials early; placement is planned for the space's most memory-hungry corner.

The search lives in `tune/<backbone>/` (Tune's experiment, `optuna.db` for optuna-dashboard,
leaderboard, `best_config.yaml`, manifest). A finished search is skipped; a search that was cut
off is resumed (`Tuner.restore`); later stages apply `best_config.yaml` (config.apply_tuned).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import yaml

from nikl_ray.artifacts import manifest_problem, read_json, sha256_file, write_json, write_manifest, write_text
from nikl_ray.backbones import BackboneSpec
from nikl_ray.config import ConfigError, Experiment
from nikl_ray.folds import fold_positions
from nikl_ray.inputs import Inputs
from nikl_ray.layout import Layout
from nikl_ray.runspec import SELECT_METRIC, FoldRun, fold_run, held_out_hash, payload_of
from nikl_ray.search_space import default_space_path, load_search_space, memory_corner
from nikl_ray.tables import markdown, write_table
from nikl_ray.tracking import mark_killed, target

log = logging.getLogger(__name__)
TRIAL_CPU = 0.01  # what a function trial holds while it waits on its Train run


def trial_name(backbone: str, config: dict, trial_id: str) -> str:
    """`<backbone>-<key>=<value>,…-<id>`: what the trial (and its Train run) is called in the dashboard."""
    values = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(config.items()))
    return f"{backbone}-{values}-{trial_id}"


def tune_trial(config: dict, template: FoldRun, finished_dir: str) -> None:
    """A Tune function trial: fit one Ray Train run with the sampled config on the tuning fold."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from nikl_ray.launcher import make_trainer

    spec = BackboneSpec(**{**template.backbone.model_dump(), **config})
    run = dataclasses.replace(template, backbone=spec, name=tune.get_context().get_trial_name())
    make_trainer(run, callbacks=[TuneReportCallback()]).fit()
    # Reached only when the run ended by itself (all epochs, or HF early stopping), never when
    # ASHA stopped the trial: the leaderboard tells the two apart by this file.
    # (Under the results root, not get_trial_dir(): that is a node-local working folder.)
    finished = Path(finished_dir)
    finished.mkdir(parents=True, exist_ok=True)
    (finished / tune.get_context().get_trial_id()).write_text("finished\n")


def run(exp: Experiment, data: Inputs, backbone: str, *, space_path: str | Path | None = None) -> Path:
    """Search `backbone`'s space on one fold as `exp.search` says (skipped when done, resumed when cut
    off). Returns best_config.yaml."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from nikl_ray.cluster import plan_stage
    from nikl_ray.launcher import start_guardian

    layout, folds, cfg = exp.layout, data.folds(exp), exp.search
    num_samples, fold, grace_period, seed = cfg.num_samples, cfg.fold, cfg.grace_period, cfg.seed
    spec = exp.backbone(backbone)
    space_path = Path(space_path or exp.search_spaces.get(backbone) or default_space_path(spec, exp.task))
    space = load_search_space(space_path, spec)
    metric = SELECT_METRIC
    prune_metric = cfg.prune_metric or metric
    if not folds["select"][fold]:
        raise ConfigError("tune scores trials on the fold's selection slice: set folds.selection above 0")
    out_dir = layout.tune(backbone)
    inputs = {"backbone": spec.model_dump(mode="json"), "space": sha256_file(space_path), "num_samples": num_samples,
              "fold": fold, "grace_period": grace_period, "prune_metric": prune_metric, "seed": seed,
              "data_hash": folds["data_hash"], "held_out_hash": held_out_hash(folds, fold), "task": exp.task.model_dump(mode="json")}
    why = manifest_problem(out_dir, inputs, __name__)
    if why is None:
        log.info("tune %s: done already (%s)", backbone, layout.best_config(backbone))
        return layout.best_config(backbone)
    experiment, started = layout.search(backbone), layout.search_inputs(backbone)
    resume = experiment.exists() and tune.Tuner.can_restore(str(experiment))
    if resume and started.exists() and read_json(started) != inputs:
        raise ConfigError(f"a search for {backbone} with other settings is in {experiment}: delete {out_dir} to start over")

    stage = plan_stage(exp, [memory_corner(spec, space)])
    placement = stage.placements[spec.name]
    # A trial = the function trial (TRIAL_CPU) + its Train worker; together they hold exactly the
    # planned CPUs, else k trials on k CPUs need k·(1+TRIAL_CPU) and a queued worker can starve.
    placement = dataclasses.replace(placement, cpus=max(placement.cpus - TRIAL_CPU, TRIAL_CPU))
    tracking = target(exp, "tune", search=backbone)
    template = fold_run(exp, spec, fold, fold_positions(data.rows, folds, fold), ray.put(payload_of(data.rows)),
                        placement, stage.device, name="", storage=str(layout.search_runs(backbone)), predict_heldout=False,
                        tracking=tracking)
    trainable = tune.with_resources(tune.with_parameters(tune_trial, template=template,
                                                         finished_dir=str(layout.finished_trials(backbone))), {"CPU": TRIAL_CPU})
    if resume:
        log.info("tune %s: resuming the search in %s", backbone, experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(started, inputs)
        storage = optuna.storages.RDBStorage(f"sqlite:///{layout.optuna_db(backbone)}")
        searcher = OptunaSearch(metric=metric, mode="max", sampler=optuna.samplers.TPESampler(seed=seed),
                                storage=storage, study_name=backbone)
        # max_t one past the last epoch: at max_t ASHA would stop even a trial that ran every epoch
        scheduler = ASHAScheduler(metric=prune_metric, mode="min" if "loss" in prune_metric else "max",
                                  max_t=spec.epochs + 1, grace_period=grace_period, reduction_factor=2)
        slots = min(stage.slots, cfg.max_concurrent or stage.slots)
        log.info("tune %s: %d trials over %s from %s, %d at once\n%s", backbone, num_samples, sorted(space), space_path,
                 slots, stage.describe())
        tuner = tune.Tuner(trainable, param_space={k: d.to_tune() for k, d in space.items()},
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                                       max_concurrent_trials=slots,
                                                       trial_name_creator=lambda t: trial_name(backbone, t.config, t.trial_id),
                                                       trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                           run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent), verbose=1))
    start_guardian()  # frees the placement group of each trial ASHA stops
    results = tuner.fit()
    mark_killed(tracking, [p for p in layout.search_runs(backbone).iterdir() if p.is_dir()])
    best = write_leaderboard(layout, spec, list(space), results, metric)
    write_manifest(out_dir, inputs=inputs, files=[best, layout.leaderboard(backbone)], code=__name__)
    return best


def write_leaderboard(layout: Layout, spec: BackboneSpec, params: list[str], results, metric: str) -> Path:
    board = []
    for r in results:
        df = r.metrics_dataframe
        has = df is not None and metric in df
        epochs = int(df["training_iteration"].max()) if has else 0
        max_epochs = int((r.config or {}).get("epochs", spec.epochs))
        if r.error:
            stopped = f"error: {type(r.error).__name__}"
        elif not (layout.finished_trials(spec.name) / str(r.metrics.get("trial_id"))).exists():
            stopped = "asha"
        else:
            stopped = "patience" if epochs < max_epochs else ""
        board.append({"trial": r.metrics.get("trial_id", Path(r.path).name) if r.metrics else Path(r.path).name,
                      **{p: (r.config or {}).get(p) for p in params},
                      "best selection score": round(float(df[metric].max()), 4) if has else None,
                      "epochs_run": epochs, "stopped_early": stopped})
    score = lambda b: b["best selection score"]  # noqa: E731
    board.sort(key=lambda b: -score(b) if score(b) is not None else 1)
    write_table(layout.leaderboard(spec.name), board)
    log.info("tune %s leaderboard:\n%s", spec.name, markdown(board))
    best = next((b for b in board if score(b) is not None), None)
    if best is None:
        errors = sorted({b["stopped_early"] for b in board})
        raise RuntimeError(f"tune {spec.name}: no trial of {len(board)} reported a selection score ({', '.join(errors)}); "
                           f"see {layout.leaderboard(spec.name).with_suffix('.md')} and each trial's error.txt under "
                           f"{layout.search(spec.name)}")
    best_config = {p: best[p] for p in params}
    path = write_text(layout.best_config(spec.name),
                      f"# best of {len(board)} trials (selection score {score(best)}); applied by later stages\n"
                      + yaml.safe_dump(best_config, sort_keys=True))
    log.info("tune %s: best %s → %s", spec.name, best_config, path)
    return path
