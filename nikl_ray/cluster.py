"""Connecting to Ray: one code path for a laptop, a single GPU box and a cluster.

`--local` starts a Ray instance on this machine, sized to it, with its dashboard bound to
127.0.0.1. Without it we join the cluster we were submitted to (`ray job submit` sets
RAY_ADDRESS) or the one `ray start --head` left running here.
"""

from __future__ import annotations

import os

import ray


def connect(local: bool = False, *, num_cpus: int | None = None, dashboard: bool = True) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers inherit these: quiet HF progress bars, stay offline unless the user says otherwise.
    env = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    if local:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), runtime_env={"env_vars": env})


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))
