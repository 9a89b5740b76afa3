"""Every use of a private Ray API, in one place: Ray may change any of these in a minor release.
`tests/test_ray_private.py` checks REQUIRED against the installed Ray and fails naming what is gone.

What is used, and why (savings measured by `benchmarks/ray_overhead.py`, 2 CPU cores, two runs
started together; the tables are in benchmarks/README.md):

- `ray.train.v2._internal.callbacks.placement_group_callback.PlacementGroupCleanerCallback`,
  `ray.train.v2._internal.execution.callback.ControllerCallback` and
  `DataParallelTrainer._create_default_callbacks`: `GuardedTrainer` puts the stage's one
  placement-group guardian (launcher.PlacementGroupGuardian, via `GuardianCallback`) in place of
  Ray Train's detached cleaner actor per run. Measured: a run's overhead 26.6 → 19.6 s (−26 %,
  `cleaner` against `guardian`); Ray Train alone, fit() returned after 11.3 → 8.9 s (`--bare`).
- `ray.train.v2._internal.callbacks.datasets.DatasetsCallback`: `GuardedTrainer` drops it for runs
  without Ray Datasets (ours have none); it starts a `DatasetManager` actor (a process importing
  Ray Data) per run. Measured: a run's overhead 11.5 → 8.0 s (0.70×), its wall 24.5 → 17.3 s
  (`datasets` against `after`).
- `ray.train.v2._internal.execution.scaling_policy.FixedScalingPolicy` (its
  `after_controller_start`, `_maybe_send_resource_request`) and
  `DataParallelTrainer._initialize_and_run_controller`: `FixedSizeScalingPolicy` sends no resource
  requests to Ray Data's autoscaling coordinator on an instance connect() started (no autoscaler
  to ask). Not measured on its own: together with driving runs from threads of the stage, a run's
  overhead 11.6 → 10.1 s (`tasks` against the `after` of then); a one-off check saw the first
  controller reach SCHEDULING in 2.6 s instead of 3.8 s.
- `ray.train.v2._internal.execution.controller.TrainController` (`worker_group_cls`),
  `ray.train.v2._internal.execution.worker_group.worker_group.WorkerGroup`
  (`_get_worker_runtime_env`), `DataParallelTrainer._register_sigint_handler` and
  `ray._raylet.RAY_NODE_ID_KEY`: `InheritingTrainer` creates the controller and its workers without
  a runtime env of their own where every process inherits the environment (connect() on this
  machine), on the driving process's node. Measured: a run's overhead 19.6 → 12.6 s (−36 %,
  `guardian` against the `tasks` of now); Ray Train alone, fit() returned after 8.9 → 7.0 s.
- `ray._private.state.state` and `ray.core.generated.gcs_pb2.PlacementGroupTableData`: the
  guardian reads which placement groups a dead controller *created* (the public
  `ray.util.placement_group_table` does not say who created a group). Needed for correctness
  (a stopped trial's group would hold its share until the job ends), not for speed.
- `ray._private.worker.get_dashboard_url`: the dashboard of a cluster joined, not started, by this
  process (`cluster.dashboard_url`; the public `ray.init()` context says it only to its caller).
- `ray._private.worker.global_worker.node.get_logs_dir_path`: where the `--bare` benchmark reads
  each controller's log to time its process start (benchmarks/ray_overhead.py only).
"""

from __future__ import annotations

import functools
import importlib
import threading

# (module, attribute path within it or "", why): what this module needs of the installed Ray
REQUIRED: list[tuple[str, str, str]] = [
    ("ray.train.v2._internal.execution.callback", "ControllerCallback", "the guardian's controller callback"),
    ("ray.train.v2._internal.callbacks.placement_group_callback", "PlacementGroupCleanerCallback",
     "replaced by the guardian's callback"),
    ("ray.train.v2._internal.callbacks.datasets", "DatasetsCallback", "dropped for runs without Ray Datasets"),
    ("ray.train.v2._internal.execution.scaling_policy", "FixedScalingPolicy._maybe_send_resource_request",
     "no autoscaling requests on a fixed-size instance"),
    ("ray.train.v2._internal.execution.scaling_policy", "FixedScalingPolicy.after_controller_start",
     "no autoscaling registration on a fixed-size instance"),
    ("ray.train.v2._internal.execution.controller", "TrainController.worker_group_cls", "the inheriting worker group"),
    ("ray.train.v2._internal.execution.worker_group.worker_group", "WorkerGroup._get_worker_runtime_env",
     "workers without a runtime env of their own"),
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._create_default_callbacks", "GuardedTrainer"),
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._initialize_and_run_controller", "GuardedTrainer"),
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._register_sigint_handler", "InheritingTrainer"),
    ("ray._raylet", "RAY_NODE_ID_KEY", "the controller on the driving process's node"),
    ("ray._private.state", "state._connect_and_get_accessor", "the guardian's placement-group table"),
    ("ray.core.generated.gcs_pb2", "PlacementGroupTableData.REMOVED", "the guardian's placement-group table"),
    ("ray._private.worker", "get_dashboard_url", "cluster.dashboard_url"),
    ("ray._private.worker", "global_worker", "benchmarks/ray_overhead.py --bare: the session's log folder"),
]


def missing(required: list[tuple[str, str, str]] | None = None) -> list[str]:
    """What of `required` (default REQUIRED) the installed Ray lacks, as `module:attribute (why)`."""
    gone = []
    for module, path, why in REQUIRED if required is None else required:
        try:
            obj = importlib.import_module(module)
            for part in filter(None, path.split(".")):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            gone.append(f"{module}:{path} ({why})")
    return gone


def dashboard_url() -> str | None:
    """The connected cluster's dashboard address as Ray reports it (may lack the scheme)."""
    import ray._private.worker

    return ray._private.worker.get_dashboard_url()


def logs_dir() -> str:
    """The connected Ray session's log folder (its processes' log files)."""
    import ray._private.worker

    return ray._private.worker.global_worker.node.get_logs_dir_path()


def placement_groups() -> list[tuple[str, object, bool]]:
    """Every placement group in the cluster's table: (creator actor id hex, placement group id bytes, removed)."""
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    table = [PlacementGroupTableData.FromString(raw) for raw in state._connect_and_get_accessor().get_placement_group_table()]
    return [(g.creator_actor_id.hex(), g.placement_group_id, g.state == PlacementGroupTableData.REMOVED) for g in table]


def guardian_callback(guardian):
    """Ray Train's controller callback that hands a run's controller to `guardian` (an actor handle
    with watch/release) as it starts, and releases it as it ends."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class GuardianCallback(ControllerCallback):
        def __init__(self):
            self._controller = None

        def after_controller_start(self, train_run_context):
            context = ray.get_runtime_context()
            self._controller = context.get_actor_id()
            ray.get(guardian.watch.remote(self._controller, context.current_actor))

        async def before_controller_shutdown(self):
            await guardian.release.remote(self._controller)

        def before_controller_abort(self):
            ray.get(guardian.release.remote(self._controller), timeout=10)

    return GuardianCallback()


@functools.cache
def trainer_classes(guard, fixed_size_env: str) -> tuple[type, type]:
    """(GuardedTrainer, InheritingTrainer), built once per process: Ray Train is imported only when a
    run is made, and the controller's actor class is exported to the cluster once, not per run.

    `guard()` gives the callback that replaces Ray's placement-group cleaner, or None to keep it;
    the environment variable `fixed_size_env` set says the instance has no autoscaler."""
    import os

    import ray
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    # Ray Train registers each run's resources with Ray Data's autoscaling coordinator, so that an
    # autoscaler adds nodes for them: a detached actor (one more process, started by the first run
    # on an instance) and a blocking call to it as each run starts and ends.
    class FixedSizeScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context):
            pass

        def _maybe_send_resource_request(self):
            pass

    class GuardedTrainer(DataParallelTrainer):
        # Ray Train starts a DatasetManager actor (a process of its own, importing Ray Data) per run to
        # hand out Ray Dataset shards, whether the run has any or not; ours pass none
        # (benchmarks/ray_overhead.py keeps it to measure what it cost)
        keep_datasets_callback = False

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if not self.datasets and not self.keep_datasets_callback:
                callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
            callback = guard()
            if callback is None:
                return callbacks
            return [callback if isinstance(c, PlacementGroupCleanerCallback) else c for c in callbacks]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if os.environ.get(fixed_size_env) and type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = FixedSizeScalingPolicy(self.scaling_config)
            return self._run_controller(**controller_init_kwargs)

        def _run_controller(self, **controller_init_kwargs):
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    # Ray Train hands its environment variables to the controller and to each worker as a runtime
    # env of their own, and the process of an actor with a runtime env starts only once Ray's
    # runtime-env agent has set it up (nor can it use an idle process Ray started ahead). Where
    # every process has those variables already, neither actor needs one.
    class InheritingWorkerGroup(WorkerGroup):
        @staticmethod
        def _get_worker_runtime_env(custom_runtime_env):
            return dict(custom_runtime_env)

    class InheritingController(TrainController):
        worker_group_cls = InheritingWorkerGroup

    InheritingController.__qualname__ = "TrainController"  # what the dashboard (and Ray's docs) call it
    controller_actor = ray.remote(num_cpus=0)(InheritingController)

    class InheritingTrainer(GuardedTrainer):
        def _run_controller(self, **controller_init_kwargs):
            # Ray's own method less the controller's runtime env: no CPU, on the driving process's node
            node = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}
            controller = controller_actor.options(label_selector=node).remote(**controller_init_kwargs)
            if threading.current_thread() is threading.main_thread():
                self._register_sigint_handler(controller)
            ray.get(controller.run.remote())
            return ray.get(controller.get_result.remote())

    return GuardedTrainer, InheritingTrainer
