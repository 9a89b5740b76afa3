"""What one fold×backbone Ray Train run costs beyond its training function, and where it goes.

    python benchmarks/ray_overhead.py                  # 3 runs per setting, one at a time, on a local Ray
    python benchmarks/ray_overhead.py --runs 5 --out results/ray_overhead
    python benchmarks/ray_overhead.py --bare           # Ray Train's own floor: runs whose function does nothing

Each run is the project's own FoldRun (a tiny GPT-NeoX in LoRA, 1 epoch on 120 demo rows), fitted
by `launcher.fit_run` under six settings, alternated so that machine noise hits all alike:

- `before`: how runs were launched until this change: TorchTrainer (a torch process group even
  for one worker, so HF wraps the model in DDP), Ray Train's defaults (its controller polls every
  2 s, a preemption watcher actor per run), bitsandbytes imported by peft in every worker;
- `cleaner`: DataParallelTrainer with Ray's plain backend (no process group, no DDP), the
  controller polling every 0.25 s, no preemption watcher, bitsandbytes not imported unless the
  run quantizes; Ray Train's detached placement-group cleaner actor started for every run;
- `guardian`: as `cleaner`, with the stage's one placement-group guardian in place of a cleaner
  per run; the controller and the worker each get Ray Train's runtime env of their own, so each
  one's process waits for Ray's runtime-env agent to set it up;
- `tasks`: as `guardian`, with no runtime env of their own (every process has the project's
  environment already); each run driven by a Ray task of its own, and Ray Train registering each
  run with Ray Data's autoscaling coordinator;
- `datasets`: as `tasks`, with each run driven from a thread of the stage's process
  (`launcher.run_all`) and no autoscaling requests on the instance connect() started;
- `after`: today's launcher: as `datasets`, without Ray Train's DatasetsCallback, which starts a
  DatasetManager actor (a process importing Ray Data) per run whether the run has Ray Datasets or not
  (ours have none).

Per run it itemises: `start` (fit() called → training function running: controller and worker
actors, placement group, worker group set-up), `imports` (function start → model loaded),
`train` (model loaded → last epoch evaluated), `finish` (→ function returned: checkpoint,
held-out prediction) and `teardown` (→ fit() returned). Writes ray_overhead.json / .md.

`--bare` times Ray Train alone (all settings but `before`; the training function does nothing):
seconds from fit() to the controller's process up (its first core-worker log line; one
run at a time only), the worker's process created and up, the function running, and fit() returned.
Writes ray_overhead_bare.json / .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Ray Train's defaults, which the project's RAY_ENV (cluster.py) changes
BEFORE_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
SETTINGS = ("before", "cleaner", "guardian", "tasks", "datasets", "after")
BARE_SETTINGS = ("cleaner", "guardian", "tasks", "datasets", "after")
IN_THREADS = ("datasets", "after")  # driven as launcher.run_all drives its runs


def train_fold_before(config: dict) -> None:
    """The worker as it was: nothing kept out of its imports (peft imported bitsandbytes in every
    worker, quantizing or not)."""
    import nikl_ray.worker as worker

    worker.quiet_worker = lambda needs_bitsandbytes: None
    worker.train_fold(config)


def before_trainer(run):
    from ray.train.torch import TorchTrainer

    from nikl_ray.launcher import run_config, scaling_config

    return TorchTrainer(train_fold_before, train_loop_config={"run": run}, scaling_config=scaling_config(run),
                        run_config=run_config(run))


def with_dataset_manager() -> type:
    """The launcher's trainer class with Ray Train's DatasetsCallback kept (the `datasets` setting).
    Built per call: a cached function in `__main__` would not reach the Ray tasks that drive runs."""
    from nikl_ray.launcher import trainer_classes

    return type("WithDatasetManager", (trainer_classes()[1],), {"keep_datasets_callback": True})


def setting_trainer(setting: str, run):
    """The trainer a setting fits `run` with, or None for the launcher's own (`launcher.make_trainer`)."""
    if setting == "before":
        return before_trainer(run)
    if setting not in ("cleaner", "datasets"):
        return None
    from ray.train import BackendConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from nikl_ray.launcher import run_config, scaling_config
    from nikl_ray.worker import train_fold

    cls = DataParallelTrainer if setting == "cleaner" else with_dataset_manager()
    return cls(train_fold, train_loop_config={"run": run}, backend_config=BackendConfig(),
               scaling_config=scaling_config(run), run_config=run_config(run))


@contextlib.contextmanager
def setting_env(setting: str):
    """The driving task's environment for a setting: Ray Train's defaults for `before`; for `guardian`,
    without connect()'s word that every process has the environment (the launcher then gives Train's
    actors Ray's runtime envs); for all but IN_THREADS, without its word that the instance has a fixed
    size (the launcher then lets Ray Train send its autoscaling requests)."""
    from nikl_ray.cluster import ENV_IN_EVERY_PROCESS, FIXED_SIZE

    change = {"before": BEFORE_ENV, "guardian": {ENV_IN_EVERY_PROCESS: None}, "after": {}}.get(setting, {})
    if setting not in IN_THREADS:
        change = {**change, FIXED_SIZE: None}
    saved = {k: os.environ.get(k) for k in change}
    set_env(change)
    try:
        yield
    finally:
        set_env(saved)


def set_env(env: dict) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def one_run(run, setting: str) -> dict:
    """The driver of one Train run: in a thread of this process for IN_THREADS (as `launcher.run_all`
    drives the train stage's runs), in a Ray task of its own for the other settings."""
    from nikl_ray.launcher import fit_run
    from nikl_ray.runfiles import final_path

    t0 = time.time()
    with setting_env(setting):
        fit_run(run, setting_trainer(setting, run))
    t_end = time.time()
    final = json.loads(final_path(run.storage, run.name).read_text())
    clock = final["clock"]
    return {"setting": setting, "start": clock["fn_start"] - t0, "imports": clock["model_loaded"] - clock["fn_start"],
            "train": clock["trained"] - clock["model_loaded"], "finish": clock["fn_end"] - clock["trained"],
            "teardown": t_end - clock["fn_end"], "wall": t_end - t0, "in_function": clock["fn_end"] - clock["fn_start"]}


def drive(setting: str, fn, runner, calls: list[tuple]) -> list:
    """`fn(*call)` for every call, driven as the setting's launcher drives its runs: from threads of
    this process for IN_THREADS (as `launcher.run_all` does), else each by a Ray task of its own (`runner`)."""
    import ray

    if setting in IN_THREADS:
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda call: fn(*call), calls))
    return ray.get([runner.remote(*call) for call in calls])


def bare_function(config: dict) -> None:
    import psutil

    Path(config["out"]).write_text(json.dumps({"fn": time.time(), "pid": os.getpid(),
                                               "created": psutil.Process().create_time()}))


def process_up(logs: str, pid: int) -> float | None:
    """When a Ray process had its core worker up: the first line of its core-worker log."""
    import datetime
    import re

    for path in Path(logs).glob(f"python-core-worker-*_{pid}.log"):
        m = re.search(r"\[(\d+-\d+-\d+ \d+:\d+:\d+,\d+)", path.open().readline())
        if m:
            return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def bare_run(setting: str, storage: str, name: str, logs: str) -> dict:
    """In a Ray task: one Train run of a function that does nothing, under one of BARE_SETTINGS."""
    from ray.train import BackendConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from nikl_ray.launcher import guarded_trainer

    out = Path(storage) / f"{name}.json"
    make = {"cleaner": DataParallelTrainer, "datasets": with_dataset_manager()}.get(setting, guarded_trainer)
    with setting_env(setting):
        trainer = make(bare_function, train_loop_config={"out": str(out)}, backend_config=BackendConfig(),
                       scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                       run_config=RunConfig(name=name, storage_path=storage))
        t0 = time.time()
        trainer.fit()
        returned = time.time()
    fn = json.loads(out.read_text())
    up = process_up(logs, fn["pid"])
    return {"setting": setting, "t0": t0, "worker created": fn["created"] - t0,
            "worker up": up - t0 if up else float("nan"), "function": fn["fn"] - t0, "returned": returned - t0}


def bare(args, settings: tuple[str, ...]) -> int:
    import ray
    from ray.util.state import list_actors

    from nikl_ray.artifacts import write_json, write_text
    from nikl_ray import ray_private
    from nikl_ray.cluster import api_server, connect
    from nikl_ray.launcher import start_guardian
    from nikl_ray.tables import markdown

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    connect(local=True, num_cpus=2)
    start_guardian()
    logs = ray_private.logs_dir()
    runner = ray.remote(num_cpus=0)(bare_run)

    def controllers() -> dict:
        return {a.actor_id: a.pid for a in list_actors(address=api_server(), filters=[("class_name", "=", "TrainController")],
                                                       limit=10000)}

    rows, seen = [], controllers()
    for i in range(args.runs):
        for setting in settings:
            calls = [(setting, str(out / "runs"), f"bare-{setting}-{i}-{j}", logs) for j in range(args.concurrent)]
            got = drive(setting, bare_run, runner, calls)
            now = controllers()
            new = [pid for a, pid in now.items() if a not in seen]
            seen = now
            for row in got:
                up = process_up(logs, new[0]) if args.concurrent == 1 and len(new) == 1 else None
                row = {"setting": row.pop("setting"), "controller up": up - row.pop("t0") if up else float("nan"),
                       **{k: v for k, v in row.items() if k != "t0"}}
                rows.append(row)
                print(f"bare {row['setting']} round {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()
                                                                        if k != "setting"), flush=True)
    keys = [k for k in rows[0] if k != "setting"]
    summary = [{"setting": s, **{k: statistics.median(r[k] for r in rows if r["setting"] == s) for k in keys}}
               for s in settings]
    write_json(out / "ray_overhead_bare.json", {"runs": rows, "median": summary})
    text = (f"# Ray Train alone: a function that does nothing ({args.runs} rounds per setting, {args.concurrent} run(s) "
            f"at once, {os.cpu_count()} CPUs)\n\nMedian seconds after fit() was called.\n\n" + markdown(summary))
    write_text(out / "ray_overhead_bare.md", text)
    print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="rounds per setting")
    ap.add_argument("--concurrent", type=int, default=1, help="runs at once in a round (2 on 2 CPUs is what the train "
                                                               "stage does; each then starts while the other trains)")
    ap.add_argument("--out", default=str(REPO / "results" / "ray_overhead"))
    ap.add_argument("--bare", action="store_true", help="time Ray Train alone, with a function that does nothing")
    ap.add_argument("--settings", nargs="+", help=f"only these settings (default: {' '.join(SETTINGS)}; "
                                                  f"with --bare: {' '.join(BARE_SETTINGS)})")
    args = ap.parse_args(argv)
    allowed = BARE_SETTINGS if args.bare else SETTINGS
    settings = tuple(args.settings or allowed)
    if not set(settings) <= set(allowed):
        ap.error(f"--settings: choose from {' '.join(allowed)}")
    if args.bare:
        return bare(args, settings)

    import ray

    from nikl_ray.artifacts import write_json, write_text
    from nikl_ray.cluster import connect
    from nikl_ray.config import parse_experiment
    from nikl_ray.folds import fold_positions
    from nikl_ray.launcher import start_guardian
    from nikl_ray.placement import Placement
    from nikl_ray.run import open_run
    from nikl_ray.runspec import Device, RowsPayload, fold_run
    from nikl_ray.tables import markdown

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "train.jsonl"  # the first 120 demo rows
    with open(REPO / "nikl_ray" / "demo_data" / "train.jsonl", encoding="utf-8") as f:
        rows_file.write_text("".join(line for _, line in zip(range(120), f)), encoding="utf-8")
    run = open_run(parse_experiment({
        "task": "nikl-emotion", "train": str(rows_file), "results": str(out),
        "folds": {"k": 2, "seed": 0}, "classical": False,
        "backbones": [{"name": "neox", "checkpoint": "tiny:gpt_neox", "mode": "lora", "epochs": 1, "lr": 5e-3,
                       "batch_size": 16, "max_length": 40}]}, REPO, "benchmark"))
    exp, data, folds = run.exp, run.inputs, run.folds
    connect(local=True, num_cpus=2)
    start_guardian()  # as the train stage does: `guardian`, `datasets` and `after` runs hand their placement groups to it
    payload = ray.put(RowsPayload.of(data.rows))
    runner = ray.remote(num_cpus=0)(one_run)
    rows = []
    for i in range(args.runs):
        for setting in settings:  # alternated: noise hits all alike
            runs = [fold_run(exp, exp.backbones[0], 0, fold_positions(data.rows, folds, 0), payload,
                             Placement("neox", 0.1, 0, 0.0, 1.0), Device(False, "cpu"),
                             name=f"{setting}-{i}-{j}", storage=str(out / "runs")) for j in range(args.concurrent)]
            for row in drive(setting, one_run, runner, [(run, setting) for run in runs]):
                rows.append(row)
                print(f"{setting} round {i}: " + ", ".join(f"{k} {v:.1f} s" for k, v in row.items() if k != "setting"),
                      flush=True)
    phases = ["start", "imports", "train", "finish", "teardown", "wall", "in_function"]
    summary = [{"setting": s, **{p: statistics.median(r[p] for r in rows if r["setting"] == s) for p in phases},
                "overhead (wall − in function)": statistics.median(r["wall"] - r["in_function"] for r in rows if r["setting"] == s)}
               for s in settings]
    write_json(out / "ray_overhead.json", {"runs": rows, "median": summary})
    text = (f"# Ray Train cost per run ({args.runs} rounds per setting, alternated, {args.concurrent} run(s) at once, "
            f"{os.cpu_count()} CPUs)\n\n"
            "Medians in seconds.\n\n" + markdown(summary))
    write_text(out / "ray_overhead.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
