"""Connecting to Ray, and what the cluster is: one code path for a laptop, a GPU box and a cluster.

`--local` starts a Ray instance on this machine, sized to it, with its dashboard bound to
127.0.0.1. Without it we join the cluster we were submitted to (`ray job submit` sets
RAY_ADDRESS) or the one `ray start --head` left running here.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray

from nikl_ray.placement import Card, ClusterShape, Placement, concurrent_slots, format_plan, plan, slots_for
from nikl_ray.runspec import Device

log = logging.getLogger(__name__)

ENV_IN_EVERY_PROCESS = "NIKL_RAY_ENV_IN_EVERY_PROCESS"
# says that the Ray instance is one connect() started on this machine: a fixed size, no autoscaler
FIXED_SIZE = "NIKL_RAY_FIXED_SIZE_INSTANCE"
# What every process of ours and Ray's gets (the ray jobs' runtime_env.yaml carries the same).
RAY_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # the dashboard's Train page lists every run (and `nikl-ray status` reads them there)
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    # the controller polls its worker this often; each epoch's report waits for the next poll
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # one actor process less per run; it only watches for node drains (cloud preemption)
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Train's print patch also logs what libraries print into a captured stdout (datasets' dill
    # disassembles functions that way): workers' plain stdout reaches the driver as it is
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # libraries' deprecation notices about each other (Ray Data in Train's controller, transformers in
    # peft): nothing a user of nikl-ray can act on
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    # what Ray Train gives its controller through a runtime env of its own (launcher.py: ours need none)
    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
    # says to the launcher that every process of this Ray job has the variables above
    ENV_IN_EVERY_PROCESS: "1",
}

_api_server: str | None = None  # dashboard of the instance connect() started


class StorageError(RuntimeError):
    pass


def _dashboard_port(preferred: int = 8265) -> int:
    """Ray's usual port when it is free, else any free one (another Ray instance on this machine)."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port for the Ray dashboard")


def connect(local: bool = False, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start (local) or join Ray. `num_gpus` on a CPU machine advertises cards that are not there
    (a simulated GPU cluster: placement and packing run as on real cards, the math on the CPU)."""
    global _api_server
    if ray.is_initialized():
        return
    if _api_server and os.environ.get("RAY_API_SERVER_ADDRESS") == _api_server:  # a previous instance's
        del os.environ["RAY_API_SERVER_ADDRESS"]
    _api_server = None
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if local:
        port = _dashboard_port()
        # Inside workers Ray's state API finds "the" cluster through /tmp/ray/ray_current_cluster, i.e.
        # the instance started last on this machine; with several, Train's state tracking (and its
        # placement-group cleaner, where one runs) would ask the wrong one. Point this instance's
        # workers at their own dashboard.
        _api_server = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        os.environ[FIXED_SIZE] = "1"
        # The environment reaches every worker by inheritance (Ray's processes start from this one's),
        # not as the job's runtime env: a process for a job or actor with a runtime env starts only
        # once Ray's runtime-env agent has set it up, and with none a Train run's controller and
        # worker start sooner (benchmarks/ray_overhead.py).
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=True, logging_level=logging.WARNING)
        log.info("Ray dashboard: %s", _api_server)
    else:
        os.environ.pop(FIXED_SIZE, None)  # a cluster may have an autoscaler that Ray Train asks for nodes
        # inside `ray job submit`: combine with the job's runtime env (runtime_env.yaml sets some of the same vars)
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        # and Ray Train's own settings a user set: Ray Train would hand them to its actors in runtime envs
        env = {k: v for k, v in os.environ.items() if k in RAY_ENV or k.startswith("RAY_TRAIN_") or k == "HF_HUB_OFFLINE"}
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), runtime_env={"env_vars": env}, logging_level=logging.WARNING)


def api_server() -> str | None:
    """The dashboard (state API) address of the instance connect() started; None when it joined a cluster."""
    return _api_server


def dashboard_url() -> str | None:
    """The connected cluster's dashboard, as an http:// address (None without one)."""
    if _api_server is not None:
        return _api_server
    from nikl_ray.ray_private import dashboard_url as reported

    try:
        url = reported()
    except Exception:  # noqa: BLE001 - no dashboard is not an error here
        return None
    return (url if url.startswith("http") else f"http://{url}") if url else None


def _alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _on_node(node_id: str, fn, *args, num_gpus: float = 0):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.remote(num_cpus=0, num_gpus=num_gpus)(fn).options(scheduling_strategy=strategy, name=fn.__name__).remote(*args)


def _read_card() -> dict:
    """On a GPU node (inside a task holding a sliver of one card): what torch sees of it."""
    import torch

    if not torch.cuda.is_available():
        return {"name": "no CUDA device", "total_gb": None, "cuda": False}
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return {"name": props.name, "total_gb": total / 1024**3, "free_gb": free / 1024**3, "cuda": True,
            "bf16": props.major >= 8}


def cluster_shape() -> ClusterShape:
    """CPUs, GPUs and, on GPU nodes, each node's card as torch sees it (one small task per node)."""
    res = ray.cluster_resources()
    nodes = _alive_nodes()
    gpu_nodes = [n for n in nodes if n["Resources"].get("GPU", 0) > 0]
    cards = []
    for node, info in zip(gpu_nodes, ray.get([_on_node(n["NodeID"], _read_card, num_gpus=0.001) for n in gpu_nodes])):
        card = Card(node["NodeID"][:8], info["name"], info["total_gb"], info["cuda"], info.get("bf16", False))
        cards += [card] * int(node["Resources"]["GPU"])
        log.info("node %s: %d × %s%s", card.node, int(node["Resources"]["GPU"]), card.name,
                 f" ({card.total_gb:.1f} GB, {info['free_gb']:.1f} GB free)" if card.total_gb else "")
    return ClusterShape(float(res.get("CPU", 0)), float(res.get("GPU", 0)), tuple(cards), len(nodes))


def _sees(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_shared_storage(results: Path) -> None:
    """On a cluster of several nodes, every node must see the results root (checkpoints are written
    by workers and read back by the driver and by other stages' tasks): fail early if one cannot."""
    nodes = [n for n in _alive_nodes() if n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2:
        return
    results.mkdir(parents=True, exist_ok=True)
    probe, token = results / f".storage-check-{uuid.uuid4().hex}", uuid.uuid4().hex
    probe.write_text(token)
    try:
        seen = ray.get([_on_node(n["NodeID"], _sees, str(probe), token) for n in nodes])
    finally:
        probe.unlink(missing_ok=True)
    blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise StorageError(f"results root {results} is not shared: node(s) {', '.join(blind)} cannot see it. On a cluster "
                           "of several machines, put `results:` on storage every node mounts at the same path "
                           "(NFS or similar).")


@dataclass(frozen=True)
class StagePlan:
    shape: ClusterShape
    device: Device
    placements: dict[str, Placement]
    budget_gb: float | None = None

    @property
    def slots(self) -> int:
        return concurrent_slots(list(self.placements.values()), self.shape.cpus, self.shape.gpus)

    def slots_of(self, backbone: str) -> int:
        """How many runs of this backbone the cluster holds at once."""
        return slots_for(self.placements[backbone], self.shape.cpus, self.shape.gpus)

    def describe(self) -> str:
        return format_plan(list(self.placements.values()), budget_gb=self.budget_gb, physical_gb=self.shape.physical_gb,
                           total_cpus=self.shape.cpus, total_gpus=self.shape.gpus if self.device.schedule_gpu else 0)


def plan_stage(exp, specs: list) -> StagePlan:
    """The placement of `specs` on the connected cluster (its cards read once)."""
    shape = cluster_shape()
    device = Device.resolve(exp.resources.use_gpu, shape.gpus, list(shape.cards))
    placements = plan(specs, exp.resources, shape, device)
    return StagePlan(shape, device, placements, shape.budget_gb(exp.resources.card_gb))
