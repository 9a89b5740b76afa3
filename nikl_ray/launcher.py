"""Runs FoldRuns on Ray Train inside the placement plan (the train stage and every tune trial); the
pretrain stage's DDP runs go through the same `guarded_trainer`.

Each run is one Ray Train run of one worker: `DataParallelTrainer` with Ray's plain backend.
One worker needs no torch process group, so HF Trainer is not wrapped in DDP (TorchTrainer
would set one up even for a world of one, and accelerate then wraps a CPU model in DDP). Ray
Train still owns the run: its controller, the worker's resources, checkpoints in the run's
storage, restarts after a failure (`FailureConfig`) and restore after a killed driver.

A run whose controller dies without cleaning up (Tune stopped its trial, the task driving it was
killed) leaves its placement group holding its share of the cluster until the job ends. Ray Train
guards against that with a detached `PlacementGroupCleaner` actor per run, which asks the state
API (the dashboard) every second whether the controller lives: one more process to start per run,
≈6 s of each run's start and teardown on 2 cores with two runs starting together
(`benchmarks/ray_overhead.py`). A stage starts one `PlacementGroupGuardian` instead: it watches
every run's controller through the controller's own actor handle (no dashboard needed) and removes
the placement groups of one that died. Runs started where no guardian is (a script calling
`fit_run`) keep Ray's cleaner. The Ray Train subclasses that do this, and every other private Ray
API used, are in nikl_ray/ray_private.py (with what each saves, as measured).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from nikl_ray import ray_private
from nikl_ray.artifacts import read_json
from nikl_ray.runfiles import final_path
from nikl_ray.runspec import CHECKPOINT_RANK, FoldRun
from nikl_ray.worker import train_fold

log = logging.getLogger(__name__)

GUARDIAN = "nikl-ray-placement-group-guardian"
_guardian = None  # the driver's handle: the guardian lives as long as the driver (and the job's placement groups)


class PlacementGroupGuardian:
    """One actor per driver: removes the placement groups of every Train run whose controller died
    without removing them (what Ray Train's per-run `PlacementGroupCleaner` does, for all runs at once).

    It removes every placement group the controller *created*, as the cluster's placement-group table
    records it, not only the one it was told of: a controller killed with its owner (Tune stopping a
    trial) is an async actor that drains its in-flight run loop before its process exits, and that
    loop, seeing its worker gone, can start a new worker group with a new placement group after Ray
    already reports the controller dead (seen in CI: created 49 ms after the first was removed). So a
    dead controller's groups are swept again each round for `sweep_s`."""

    def __init__(self, check_interval_s: float = 1.0, sweep_s: float = 30.0):
        self._runs: dict = {}  # controller actor id -> its handle
        self._dead: dict[str, float] = {}  # controller actor id -> until when its placement groups are swept
        self._lock = threading.Lock()
        self._sweep_s = sweep_s
        threading.Thread(target=self._watch, args=(check_interval_s,), daemon=True, name="guardian").start()

    def watch(self, controller_id: str, controller) -> None:
        with self._lock:
            self._runs[controller_id] = controller

    def release(self, controller_id: str) -> None:
        with self._lock:
            self._runs.pop(controller_id, None)

    def watching(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def _watch(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            for controller_id in self.watching():
                self._check(controller_id)
            now = time.time()
            self._dead = {c: until for c, until in self._dead.items() if until > now}
            if self._dead:
                self._sweep(set(self._dead))

    def _check(self, controller_id: str) -> None:
        import ray

        with self._lock:
            controller = self._runs.get(controller_id)
        if controller is None:
            return
        try:
            ray.get(controller.__ray_ready__.remote(), timeout=10)
            return
        except ray.exceptions.GetTimeoutError:  # busy, not dead: ask again next round
            return
        except ray.exceptions.RayActorError:
            pass
        with self._lock:
            if self._runs.pop(controller_id, None) is None:  # released meanwhile: the run ended by itself
                return
        self._dead[controller_id] = time.time() + self._sweep_s

    def _sweep(self, controller_ids: set[str]) -> None:
        """Remove the live placement groups that these controllers created."""
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        try:
            table = ray_private.placement_groups()
        except Exception as e:  # noqa: BLE001 - the cluster is going away; the next round asks again
            log.debug("could not read the placement-group table: %s", e)
            return
        for creator, group_id, removed in table:
            if creator in controller_ids and not removed:
                log.warning("a Train controller died without cleaning up: removing its placement group %s", group_id.hex())
                try:
                    remove_placement_group(PlacementGroup(ray.PlacementGroupID(group_id)))
                except Exception as e:  # noqa: BLE001 - removed already, or the cluster is going away
                    log.warning("could not remove placement group %s: %s", group_id.hex(), e)


def start_guardian():
    """Start (or find) the driver's placement-group guardian; the stages call this before their runs."""
    import ray

    global _guardian
    try:
        return ray.get_actor(GUARDIAN)
    except ValueError:  # none on this Ray instance yet; the handle kept here keeps it alive (it is not detached)
        _guardian = ray.remote(num_cpus=0)(PlacementGroupGuardian).options(name=GUARDIAN).remote()
        return _guardian


def _guardian_callback():
    """Ray Train's callback that hands a run's controller to the guardian as it starts, or None without one."""
    import ray

    try:
        guardian = ray.get_actor(GUARDIAN)
    except ValueError:
        return None
    return ray_private.guardian_callback(guardian)


def trainer_classes() -> tuple[type, type]:
    """(GuardedTrainer, InheritingTrainer) of this process (ray_private.trainer_classes)."""
    from nikl_ray.cluster import FIXED_SIZE

    return ray_private.trainer_classes(_guardian_callback, FIXED_SIZE)


def guarded_trainer(train_fn, **kwargs):
    """A Ray Train `DataParallelTrainer` whose runs hand their placement group to the driver's
    guardian (and keep Ray Train's own cleaner where there is none), and whose controller and
    workers get no runtime env of their own where `connect()` gave every process the environment."""
    from nikl_ray.cluster import ENV_IN_EVERY_PROCESS

    guarded, inheriting = trainer_classes()
    return (inheriting if os.environ.get(ENV_IN_EVERY_PROCESS) else guarded)(train_fn, **kwargs)


def run_config(run: FoldRun, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    scored = len(run.select_idx) > 0  # with a selection slice Ray keeps the best epoch, else the latest
    return RunConfig(name=run.name, storage_path=run.storage, failure_config=FailureConfig(max_failures=run.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_RANK if scored else None,
                                                        checkpoint_score_order="max"),
                     # Ray Train's own state transitions and reports stay in its log files (and the
                     # dashboard); the worker prints one line per epoch
                     logging_config=LoggingConfig(log_level="WARNING"), callbacks=callbacks)


def scaling_config(run: FoldRun):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=1, use_gpu=run.schedule_gpu, resources_per_worker=run.placement.resources())


def make_trainer(run: FoldRun, callbacks: list | None = None):
    """The Ray Train trainer of one FoldRun (a generate task's runs train a causal LM: qa/worker.py)."""
    from ray.train import BackendConfig

    if run.task.generates:
        from nikl_ray.qa.worker import train_qa_fold as fn
    else:
        fn = train_fold
    return guarded_trainer(fn, train_loop_config={"run": run}, backend_config=BackendConfig(),
                           scaling_config=scaling_config(run), run_config=run_config(run, callbacks))


def fit_run(run: FoldRun, trainer=None) -> dict:
    """Fit one run; where its best and latest checkpoints are, its last metrics, wall time."""
    t0 = time.time()
    result = (trainer or make_trainer(run)).fit()
    scored = len(run.select_idx) > 0
    best = result.get_best_checkpoint(metric=CHECKPOINT_RANK, mode="max") if scored else result.checkpoint
    final = final_path(run.storage, run.name)
    return {"best_checkpoint": best.path, "latest_checkpoint": result.checkpoint.path,
            "metrics": read_json(final) if final.exists() else {}, "wall_seconds": time.time() - t0}


def run_all(runs: list[FoldRun], slots_of, on_done, on_failed) -> None:
    """Fit every run; `on_done(run, out)` / `on_failed(run, error)` as each ends.

    `slots_of(run)`: how many runs like it the cluster holds at once. A run takes 1/slots of the
    cluster, and no more runs are submitted than fit together: a queued Train run's controller
    would start and wait for its share, slowing the running trials on small machines.

    Each run's `fit()` is driven from a thread of this process (as Tune drives a trial's from its
    actor's thread): a Ray task per run needs a process of its own (a new one, importing Ray Train,
    when no idle one is left), and each exports the controller's class again, while the runs that
    started before it train (benchmarks/ray_overhead.py: `tasks` against `after`, which also drops
    the autoscaling requests).
    The threads are daemons: an interrupted driver does not wait for them, and its exit ends the runs.
    """
    import queue

    start_guardian()
    trainer_classes()  # Ray Train imported here once, not by the first threads at the same time
    ended: queue.Queue = queue.Queue()

    def drive(run: FoldRun) -> None:
        try:
            ended.put((run, fit_run(run), None))
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others' results
            ended.put((run, None, e))

    todo, running = list(runs), {}  # id -> run (a FoldRun's fields hold arrays: no == between runs)
    while todo or running:
        taken = sum(1 / slots_of(r) for r in running.values())
        while todo and (not running or taken + 1 / slots_of(todo[0]) <= 1 + 1e-9):
            run = todo.pop(0)
            taken += 1 / slots_of(run)
            running[id(run)] = run
            threading.Thread(target=drive, args=(run,), name=f"fit {run.name}", daemon=True).start()
        run, out, error = ended.get()
        del running[id(run)]
        if error is not None:
            on_failed(run, error)
        else:
            on_done(run, out)
