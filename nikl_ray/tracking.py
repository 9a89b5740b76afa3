"""Where runs are tracked: TensorBoard, MLflow and Weights & Biases, as the experiment's `tracking:` says.

    tracking: [tensorboard, mlflow, {wandb: {project: nikl, mode: offline}}]   # or `none`; default tensorboard

Every fold run, pretraining run and search trial is one tracked run, named as the Ray dashboard
names it, opened on rank 0 of its Ray Train worker (`Tracker.open`); the ensemble stage is one
more. A run's parameters, its train loss every `log_every_steps` optimizer steps, each epoch's
selection scores and per-label F1, and at the end its best epoch and held-out score. The ids of
a run's MLflow and W&B runs are kept in its folder (`tracking.json`): a restarted or resumed run
logs on into the same tracked run; a run trained again from scratch (its folder made afresh) is
a new one. Where things go:

    TensorBoard  <run folder>/tensorboard/      (`tensorboard --logdir <results>` shows them all)
    MLflow       sqlite:///<results>/tracking/mlflow.db unless `tracking_uri`; experiment <name>
                 for train, pretrain and ensemble, <name>/tune/<backbone> for each search
    W&B          <run folder>/wandb/ (offline by default: `wandb sync` uploads); group as MLflow's experiment

Written on the libraries' public APIs (SummaryWriter, MlflowClient, wandb.init) rather than HF's
`report_to` integrations: those are configured only through environment variables, MLflow's logs
every TrainingArguments field (the temporary output folder differs per attempt, and MLflow refuses
a changed parameter of a resumed run), they end their run at `on_train_end`, before the held-out
score, and cannot serve the ensemble stage. MLflow's default store is SQLite because MLflow 3
refuses to create file stores. Credentials stay in environment variables (WANDB_API_KEY,
MLFLOW_TRACKING_TOKEN, …), which the libraries read themselves: nothing here reads, logs or writes them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)
TRACKERS = ("tensorboard", "mlflow", "wandb")
IDS = "tracking.json"  # in a run's folder: its MLflow run id and W&B run id
PACKAGE_HINT = "pip install 'nikl-ray[tracking]' (on a cluster: ray_jobs/runtime_env.yaml)"
CREDENTIAL_WORDS = ("key", "token", "password", "secret")


# ---------------------------------------------------------------------------- the experiment's section
class MlflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = Field(None, description="An MLflow tracking URI (a server, a database); default "
                                                       "sqlite:///<results>/tracking/mlflow.db.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v and "://" in v and (urlsplit(v).username or urlsplit(v).password):
            raise ValueError("tracking_uri holds credentials: give them as MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in the environment instead")
        return v


class WandbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = "nikl-ray"
    entity: str | None = None
    mode: Literal["offline", "online"] = Field("offline", description="offline: run folders only (`wandb sync` uploads "
                                                                      "them); online needs WANDB_API_KEY on every node.")


class TrackingConfig(BaseModel):
    """The experiment's `tracking:` — `none`; a tracker's name; a list of names or one-key mappings
    (`[tensorboard, {mlflow: {tracking_uri: …}}]`: only those); or this mapping (TensorBoard on
    unless `tensorboard: false`)."""

    model_config = ConfigDict(extra="forbid")
    tensorboard: bool = Field(True, description="Event files in each run's folder.")
    mlflow: MlflowConfig | None = None
    wandb: WandbConfig | None = None
    experiment: str | None = Field(None, description="MLflow experiment and W&B group of the runs (a search's: "
                                                     "<experiment>/tune/<backbone>); default: the task's name.")
    log_every_steps: int = Field(20, ge=1, description="The train loss is tracked as the mean of this many optimizer steps.")
    progress_seconds: float = Field(30, gt=0, description="Inside an epoch, a progress line at least this often.")
    progress_bars: bool | None = Field(None, description="Ray's tqdm bars instead of progress lines; default: when the "
                                                         "command's console is a terminal.")

    @model_validator(mode="before")
    @classmethod
    def _forms(cls, v: Any) -> Any:
        if v is None:
            return {}
        if v is False or v == "none":
            return {"tensorboard": False}
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            out: dict = {"tensorboard": False}
            for item in v:
                if isinstance(item, str):
                    name, options = item, {}
                elif isinstance(item, dict) and len(item) == 1:
                    (name, options), = item.items()
                else:
                    raise ValueError(f"each tracker is a name or a one-key mapping ({{wandb: {{mode: offline}}}}), not {item!r}")
                if name not in TRACKERS:
                    raise ValueError(f"unknown tracker {name!r}; choose from {list(TRACKERS)}")
                out[name] = True if name == "tensorboard" else (options or {})
            v = out
        if isinstance(v, dict):
            for name, options in v.items():
                words = [k for k in (options if isinstance(options, dict) else {}) if any(w in k.lower() for w in CREDENTIAL_WORDS)]
                if words:
                    raise ValueError(f"{name}: {words[0]}: credentials go in environment variables (WANDB_API_KEY, "
                                     "MLFLOW_TRACKING_TOKEN, …) on every node, never in the experiment")
            v = {k: ({} if o is True else None if o is False else o) if k in ("mlflow", "wandb") else o for k, o in v.items()}
        return v

    @property
    def trackers(self) -> list[str]:
        return [t for t in TRACKERS if getattr(self, t) not in (None, False)]


# ---------------------------------------------------------------------------- one stage's target
@dataclass(frozen=True)
class Target:
    """Where one stage's runs are tracked and how they show progress: resolved in the driver, it
    travels with each run to its Ray Train worker."""

    stage: str  # train | pretrain | tune | ensemble: W&B's job type, an MLflow tag
    experiment: str  # MLflow experiment, W&B group
    tensorboard: bool
    mlflow_uri: str | None
    mlflow_experiment_id: str | None
    wandb: dict | None
    log_every_steps: int
    progress_seconds: float
    progress_bars: bool
    tags: dict = field(default_factory=dict)

    @property
    def trackers(self) -> list[str]:
        return [t for t, on in (("tensorboard", self.tensorboard), ("mlflow", self.mlflow_uri), ("wandb", self.wandb)) if on]


def untracked() -> Target:
    """Where a run built without a stage's Target logs: nowhere; progress lines as by default."""
    cfg = TrackingConfig()
    return Target("train", "", False, None, None, None, cfg.log_every_steps, cfg.progress_seconds, False)


def mlflow_uri(exp) -> str | None:
    cfg = exp.tracking.mlflow
    return None if cfg is None else cfg.tracking_uri or f"sqlite:///{exp.layout.mlflow_db}"


def experiment_name(exp, search: str | None = None) -> str:
    name = exp.tracking.experiment or exp.task.name
    return f"{name}/tune/{search}" if search else name


def target(exp, stage: str, *, search: str | None = None) -> Target:
    """The stage's Target, with its MLflow database and experiment made here, once, before any run
    opens them (the first connection creates the tables: two at once can race); a tracker whose
    package is missing fails here, before anything trains."""
    cfg = exp.tracking
    for name, module in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if getattr(cfg, name) is not None and importlib.util.find_spec(module) is None:
            from nikl_ray.config import ConfigError

            raise ConfigError(f"tracking: {name} needs the {module} package: {PACKAGE_HINT}")
    bars = cfg.progress_bars if cfg.progress_bars is not None else sys.stderr.isatty()
    uri, name = mlflow_uri(exp), experiment_name(exp, search)
    experiment_id = None
    if uri:
        if uri.startswith("sqlite:///"):
            exp.layout.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow_experiment(uri, name, exp.layout.mlflow_artifacts)
    if cfg.wandb and cfg.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("tracking: wandb is online but WANDB_API_KEY is not set here: every node's environment needs it "
                    "(or `wandb login` there), else each run fails at its start")
    return Target(stage, name, cfg.tensorboard, uri, experiment_id, cfg.wandb.model_dump() if cfg.wandb else None,
                  cfg.log_every_steps, cfg.progress_seconds, bars,
                  {"results": str(exp.layout.root), "stage": stage, "task": exp.task.name})


def mlflow_experiment(uri: str, name: str, artifacts: Path) -> str:
    """The id of MLflow experiment `name` at `uri`, made if missing (its artifacts beside the database)."""
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(artifacts / name).as_uri() if uri.startswith("sqlite:")
                                        else None)
    except Exception:  # noqa: BLE001 - made meanwhile by another process: read it
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def mark_killed(target: Target, run_dirs) -> None:
    """MLflow runs of these run folders that a killed process left RUNNING (trials ASHA stopped, a
    trial killed with its driver): KILLED, as MLflow names it. Found by name in the target's experiment
    and results folder, not by the folder's ids: a process killed inside `Tracker.open` made its run
    but not that file. Call it when none of them can be running. A W&B offline run folder needs
    nothing: `wandb sync` uploads what it holds."""
    if not target.mlflow_uri:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=target.mlflow_uri)
    names = {Path(d).name for d in run_dirs}
    for run in client.search_runs([target.mlflow_experiment_id], "attributes.status = 'RUNNING'", max_results=50000):
        if run.info.run_name in names and run.data.tags.get("results") == target.tags.get("results"):
            client.set_terminated(run.info.run_id, status="KILLED")


# ---------------------------------------------------------------------------- one tracked run
class Tracker:
    """One run's trackers. `open` it on rank 0 only; use it as a context manager (a run that raises
    is marked failed; one that was killed is reopened by its next attempt)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, target: Target | None, name: str, run_dir: str | Path, params: dict) -> "Tracker":
        if target is None or not target.trackers:
            return cls([])
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ids_path = run_dir / IDS
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        tracker = cls([])
        try:
            if target.tensorboard:
                tracker.sinks.append(TensorBoardSink(run_dir / "tensorboard"))
            if target.mlflow_uri:
                tracker.sinks.append(MlflowSink(target, name, ids.get("mlflow")))
                tracker.keep_ids(ids_path)  # now, not after W&B's slow start: a kill meanwhile loses no id
            if target.wandb:
                tracker.sinks.append(WandbSink(target, name, run_dir, ids.get("wandb")))
        except Exception:
            tracker.close(failed=True)  # the trackers already opened are not left running
            raise
        tracker.keep_ids(ids_path)
        tracker.params(params)
        return tracker

    def keep_ids(self, path: Path) -> None:
        path.write_text(json.dumps({s.kind: s.run_id for s in self.sinks if s.run_id}, indent=1))

    def params(self, values: dict) -> None:
        flat = {k: v for k, v in flatten(values).items() if v is not None}
        for s in self.sinks:
            s.params(flat)

    def metrics(self, values: dict, step: int) -> None:
        values = {k: float(v) for k, v in values.items() if is_number(v)}
        if values:
            for s in self.sinks:
                s.metrics(values, step)

    def summary(self, values: dict, step: int) -> None:
        """A run's end results (best epoch, held-out scores): metrics at its last step and its summary."""
        values = {k: v for k, v in flatten(values).items() if v is not None}
        for s in self.sinks:
            s.summary(values, step)

    def table(self, name: str, rows: list[dict]) -> None:
        if rows:
            for s in self.sinks:
                s.table(name, rows)

    def close(self, failed: bool = False) -> None:
        # the last opened first: MLflow's FINISHED comes after W&B has its end (a trial stopped mid-close
        # stays RUNNING in MLflow, then KILLED, rather than FINISHED with a W&B run that lacks its end)
        for s in reversed(self.sinks):
            try:
                s.close(failed)
            except Exception as e:  # noqa: BLE001 - one tracker's failure to close must not lose the run
                log.warning("tracking: closing %s failed: %s", s.kind, e)
        self.sinks = []

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(failed=kind is not None)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def text_of(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


class TensorBoardSink:
    kind, run_id = "tensorboard", None

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        # flushed as often as W&B flushes its run file (15 s): a killed run (a trial ASHA stopped) loses at most that
        self.writer = SummaryWriter(str(log_dir), flush_secs=15)

    def params(self, values: dict, tag: str = "params") -> None:
        from nikl_ray.tables import markdown

        self.writer.add_text(tag, markdown([{"name": k, "value": text_of(v)} for k, v in values.items()]))

    def metrics(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def summary(self, values: dict, step: int) -> None:
        self.metrics({k: float(v) for k, v in values.items() if is_number(v)}, step)
        words = {k: v for k, v in values.items() if not is_number(v)}
        if words:
            self.params(words, tag="summary")

    def table(self, name: str, rows: list[dict]) -> None:
        from nikl_ray.tables import markdown

        self.writer.add_text(name, markdown(rows))

    def close(self, failed: bool) -> None:
        self.writer.close()


class MlflowSink:
    kind = "mlflow"
    MAX_PARAM = 6000  # MLflow's longest parameter value

    def __init__(self, target: Target, name: str, run_id: str | None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=target.mlflow_uri)
        self.run_id = None
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            except Exception as e:  # noqa: BLE001 - deleted meanwhile: a new run
                log.info("tracking: MLflow run %s is gone (%s): starting a new one", run_id, e)
        if self.run_id is None:  # in the experiment the driver made (tracking.target)
            self.run_id = self.client.create_run(target.mlflow_experiment_id, run_name=name, tags=target.tags).info.run_id

    def params(self, values: dict) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params  # a resumed run's: MLflow refuses them again if changed
        params = [Param(k, text_of(v)[: self.MAX_PARAM]) for k, v in values.items() if k not in logged]
        if params:
            self.client.log_batch(self.run_id, params=params)

    def metrics(self, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def summary(self, values: dict, step: int) -> None:
        self.metrics({k: float(v) for k, v in values.items() if is_number(v)}, step)
        for k, v in values.items():
            if not is_number(v):
                self.client.set_tag(self.run_id, k, text_of(v)[:5000])

    def table(self, name: str, rows: list[dict]) -> None:
        self.client.log_table(self.run_id, {c: [r.get(c) for r in rows] for c in rows[0]}, f"{name}.json")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbSink:
    kind = "wandb"

    def __init__(self, target: Target, name: str, run_dir: Path, run_id: str | None):
        import wandb

        cfg = target.wandb
        self.run = wandb.init(project=cfg["project"], entity=cfg.get("entity"), mode=cfg["mode"], dir=str(run_dir),
                              name=name, group=target.experiment, job_type=target.stage, tags=[target.stage],
                              id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(silent=True, console="off"))
        self.run_id = self.run.id

    def params(self, values: dict) -> None:
        self.run.config.update(values, allow_val_change=True)

    def metrics(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict, step: int) -> None:
        self.run.summary.update(values)

    def table(self, name: str, rows: list[dict]) -> None:
        import wandb

        columns = list(rows[0])
        self.run.log({name: wandb.Table(columns=columns, data=[[text_of(r.get(c)) if isinstance(r.get(c), (dict, list))
                                                                 else r.get(c) for c in columns] for r in rows])})

    def close(self, failed: bool) -> None:
        import wandb

        self.run.finish(exit_code=1 if failed else 0)
        wandb.teardown()  # its service process: a Ray worker (or the driver) outlives the run


# ---------------------------------------------------------------------------- a run's train loss
class StepLosses:
    """The train loss of the last optimizer steps: the Trainer adds each micro-batch's loss (already
    divided for gradient accumulation, so one step's sum is its loss), keyed by the step it belongs to."""

    def __init__(self, window: int):
        self.done: deque = deque(maxlen=max(window - 1, 1))
        self.step, self.current = None, None

    def add(self, loss, step: int) -> None:
        if step != self.step and self.current is not None:
            self.done.append(self.current)
            self.current = None
        self.step = step
        self.current = loss if self.current is None else self.current + loss

    def mean(self) -> float | None:
        """The mean loss of the last `window` steps (the current one included), or None before the first."""
        losses = list(self.done) + ([self.current] if self.current is not None else [])
        return float(sum(losses) / len(losses)) if losses else None  # one transfer from the device


def track_commands(exp) -> list[str]:
    """Where a run's trackers are, each with the command that opens it (`status`, the README)."""
    cfg, results, uri, lines = exp.tracking, exp.layout.root, mlflow_uri(exp), []
    if cfg.tensorboard:
        lines.append(f"TensorBoard (each run's <run folder>/tensorboard): tensorboard --logdir {results}")
    if uri:
        lines.append(f"MLflow: mlflow ui --backend-store-uri {uri}")
    if cfg.wandb and cfg.wandb.mode == "offline":
        found = len(list(results.glob("**/wandb/offline-run-*")))
        lines.append(f"W&B offline ({found} run folder(s)): wandb sync $(find {results} -type d -name 'offline-run-*')")
    elif cfg.wandb:
        lines.append(f"W&B: https://wandb.ai/{cfg.wandb.entity or '<entity>'}/{cfg.wandb.project}")
    return lines
