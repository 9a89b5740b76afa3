"""Connecting to Ray: one code path for a laptop, a single GPU box and a cluster.

`--local` starts a Ray instance on this machine, sized to it, with its dashboard bound to
127.0.0.1. Without it we join the cluster we were submitted to (`ray job submit` sets
RAY_ADDRESS) or the one `ray start --head` left running here.
"""

from __future__ import annotations

import os
import socket

import ray

_api_server: str | None = None  # dashboard of the instance connect() started ("" if started without one)


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


def connect(local: bool = False, *, num_cpus: int | None = None, dashboard: bool = True) -> None:
    global _api_server
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers inherit these: quiet HF progress bars, stay offline unless the user says otherwise.
    env = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    if local:
        ports = {}
        _api_server = ""
        if dashboard:
            ports["dashboard_port"] = _dashboard_port()
            # Inside workers Ray's state API finds "the" cluster through /tmp/ray/ray_current_cluster,
            # i.e. the instance started last on this machine; with several, Train's placement-group
            # cleaner would ask the wrong one. Point this instance's workers at their own dashboard.
            _api_server = env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{ports['dashboard_port']}"
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", **ports,
                 runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), runtime_env={"env_vars": env})


def api_server() -> str | None:
    """The dashboard (state API) address of the instance connect() started; None when it joined a cluster."""
    return _api_server or None


def state_api_problem() -> str | None:
    """Why Ray's state API cannot be reached, or None. Ray Train frees the resources of a run whose
    Tune trial was stopped early only by asking the state API (served by the dashboard) whether the
    run's controller is still alive; without it they stay held and later trials wait for ever."""
    from ray.util.state import list_actors

    if _api_server == "":
        return "this Ray instance was started without its dashboard"
    try:
        list_actors(address=_api_server, limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))
