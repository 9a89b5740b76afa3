"""Runs FoldRuns on Ray Train inside the placement plan (the train stage and every tune trial).

Each run is one Ray Train run of one worker: `DataParallelTrainer` with Ray's plain backend.
One worker needs no torch process group, so HF Trainer is not wrapped in DDP (TorchTrainer
would set one up even for a world of one, and accelerate then wraps a CPU model in DDP). Ray
Train still owns the run: its controller, the worker's resources, checkpoints in the run's
storage, restarts after a failure (`FailureConfig`) and restore after a killed driver.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nikl_ray.artifacts import read_json
from nikl_ray.runspec import SELECT_METRIC, FoldRun
from nikl_ray.worker import FINAL, train_fold

log = logging.getLogger(__name__)


def run_config(run: FoldRun, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    scored = len(run.select_idx) > 0  # with a selection slice Ray keeps the best epoch, else the latest
    return RunConfig(name=run.name, storage_path=run.storage, failure_config=FailureConfig(max_failures=run.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SELECT_METRIC if scored else None,
                                                        checkpoint_score_order="max"),
                     # Ray Train's own state transitions and reports stay in its log files (and the
                     # dashboard); the worker prints one line per epoch
                     logging_config=LoggingConfig(log_level="WARNING"), callbacks=callbacks)


def scaling_config(run: FoldRun):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=1, use_gpu=run.schedule_gpu, resources_per_worker=run.placement.resources())


def make_trainer(run: FoldRun, callbacks: list | None = None):
    """The Ray Train trainer of one FoldRun."""
    from ray.train import BackendConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer(train_fold, train_loop_config={"run": run}, backend_config=BackendConfig(),
                               scaling_config=scaling_config(run), run_config=run_config(run, callbacks))


def fit_run(run: FoldRun, trainer=None) -> dict:
    """Fit one run (as a Ray task); where its best and latest checkpoints are, its last metrics, wall time."""
    t0 = time.time()
    result = (trainer or make_trainer(run)).fit()
    scored = len(run.select_idx) > 0
    best = result.get_best_checkpoint(metric=SELECT_METRIC, mode="max") if scored else result.checkpoint
    final = Path(run.storage) / run.name / FINAL
    return {"best_checkpoint": best.path, "latest_checkpoint": result.checkpoint.path,
            "metrics": read_json(final) if final.exists() else {}, "wall_seconds": time.time() - t0}


def run_all(runs: list[FoldRun], slots_of, on_done, on_failed) -> None:
    """Fit every run; `on_done(run, out)` / `on_failed(run, error)` as each ends.

    `slots_of(run)`: how many runs like it the cluster holds at once. A run takes 1/slots of the
    cluster, and no more runs are submitted than fit together: a queued Train run's controller
    would start and wait for its share, slowing the running trials on small machines.
    """
    import ray

    launch = ray.remote(num_cpus=0)(fit_run)
    todo, pending = list(runs), {}
    while todo or pending:
        taken = sum(1 / slots_of(r) for r in pending.values())
        while todo and (not pending or taken + 1 / slots_of(todo[0]) <= 1 + 1e-9):
            run = todo.pop(0)
            taken += 1 / slots_of(run)
            pending[launch.options(name=f"fit {run.name}").remote(run)] = run
        done, _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except Exception as e:  # one failed run must not lose the others' results
            on_failed(run, e)
            continue
        on_done(run, out)
