"""Experiment files: one YAML that says what to train on, with which backbones, and where to write.

Relative paths are taken from the YAML file's folder. `defaults` applies to every backbone
(each backbone's own keys win). Reading a file builds and writes nothing: `run.open_run` is
where tiny backbones (`checkpoint: tiny:<kind>` — electra, roberta, bert, gpt_neox, llama) are
built and what pretraining and `nikl-ray tune` found is applied (a searched key takes the tuned
value, also over a value the experiment pins, which is then logged).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nikl_ray.backbones import BackboneSpec
from nikl_ray.layout import Layout
from nikl_ray.modes import mode_of
from nikl_ray.tasks import TaskSpec, get_task
from nikl_ray.tracking import TrackingConfig

log = logging.getLogger(__name__)
DEFAULT_MAX_NEW_TOKENS = 64


class ConfigError(ValueError):
    pass


class FoldsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(5, ge=2, le=20, description="Number of folds.")
    seed: int = Field(42, description="Seed of the stratified split.")
    selection: float = Field(0.1, ge=0, lt=0.5, description="Share of each fold's training rows held aside to choose the "
                                                            "epoch (never the held-out fold, whose predictions are the "
                                                            "out-of-fold features); 0: no early stopping, the last epoch is kept.")


class ResourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    use_gpu: bool | None = Field(None, description="Train on GPUs; default: when the cluster has any.")
    card_gb: float | None = Field(None, gt=0, description="Memory budget per card (GiB) for the placement plan; default: "
                                                          "the smallest card found. Below the physical card, each trial is "
                                                          "capped as if the card had this much.")
    max_trials_per_card: int = Field(8, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs each trial's worker holds.")
    max_failures: int = Field(2, ge=0, description="Times Ray Train restarts a failed run from its last checkpoint.")


class SearchConfig(BaseModel):
    """How `tune` searches (the command line's flags override these)."""

    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(8, ge=1, description="Trials per backbone.")
    fold: int = Field(0, ge=0, description="The fold whose selection slice scores the trials.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial may be stopped.")
    prune_metric: str | None = Field(None, description="What ASHA compares: default the selection score; or eval_loss.")
    seed: int = Field(0, description="TPE sampler seed.")
    max_concurrent: int | None = Field(None, ge=1, description="At most this many trials at once (default: all that fit); "
                                                               "1 makes ASHA's decisions reproducible.")


class EnsembleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_sizes: list[int] = Field([64, 96, 128, 256, 512], min_length=1, description="MLP head hidden sizes; one head each.")
    inner_folds: int = Field(5, ge=2, description="Inner K-fold of the heads over the out-of-fold features; also the "
                                                  "folds over which decision rules are cross-fitted.")
    epochs: int = Field(200, ge=1, description="Maximum epochs of a head.")
    patience: int = Field(20, ge=1, description="Epochs without gain on the head's early-stopping slice before it stops.")
    early_stopping: float = Field(0.1, ge=0, lt=0.5, description="Share of each head's training rows held aside to choose "
                                                                 "its epoch; 0: train all epochs.")
    dropout: float = Field(0.2, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    test_rows: Literal["routed", "bagged"] = Field(
        "bagged", description="How a test (or served) row is answered: `bagged`, by every fold model and every inner fold "
                              "of heads, averaged (K× the fold-model compute per row; +0.5–0.6 points held out on NIKL "
                              "and NSMC-like rows, benchmarks/test_rows.py); `routed`, by the one fold model and inner "
                              "fold a stable hash of the row picks, as each out-of-fold row is.")


class DistillConfig(BaseModel):
    """`nikl-ray distill`: one student trained on the ensemble's probabilities (nikl_ray/stages/distill.py)."""

    model_config = ConfigDict(extra="forbid")
    student: str | None = Field(None, description="The backbone (one of `backbones`, as the run trained it) the student "
                                                  "starts from; default: the first encoder. Trained in full.")
    overrides: dict[str, Any] = Field({}, description="Backbone keys the student sets for itself (epochs, lr, …).")
    pool: list[Path] = Field([], description="Unlabelled rows in the task's format that the ensemble labels and the "
                                             "student also learns from.")


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: TaskSpec = Field(description="A built-in task name or a task mapping.")
    train: list[Path] = Field(min_length=1, description="Labelled data files (folds are made over all of them).")
    test: Path | None = Field(None, description="Unlabelled rows to predict and submit.")
    results: Path = Field(Path("results"), description="Results root.")
    folds: FoldsConfig = FoldsConfig()
    backbones: list[BackboneSpec] = Field(min_length=1)
    classical: bool | list[Literal["tfidf-lr", "tfidf-wc-lr", "nbsvm", "use-lr"]] = Field(
        True, description="Classical members, each cross-fitted like a backbone (nikl_ray/members.py): true is "
                          "char n-gram TF-IDF + logistic regression (classify tasks), or TF-IDF retrieval of the "
                          "nearest training question's answer (generate tasks); a list names classify members: "
                          "tfidf-lr, tfidf-wc-lr (word and char n-grams), nbsvm (NB-SVM, calibrated), use-lr "
                          "(multilingual USE v3 sentence vectors + logistic regression).")
    retrieval_items: int = Field(5, ge=1, le=50, description="generate tasks: the retrieval member's candidates for MBR "
                                                             "are the references of this many nearest training items "
                                                             "(its own answer: the nearest one's first).")
    resources: ResourcesConfig = ResourcesConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    search_spaces: dict[str, Path] = Field({}, description="Backbone name → search space YAML for `tune`.")
    search: SearchConfig = SearchConfig()
    distill: DistillConfig = DistillConfig()
    tracking: TrackingConfig = Field(TrackingConfig(), description="Where runs are tracked: `none`, `tensorboard` "
                                     "(the default), `mlflow`, `wandb`, a list of them, or a mapping (nikl_ray/tracking.py).")
    pinned: dict[str, list[str]] = Field({}, description="(filled by the reader) keys each backbone sets itself.")

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, v: Any) -> TaskSpec:
        return get_task(v)

    @field_validator("backbones")
    @classmethod
    def _unique(cls, v: list[BackboneSpec]) -> list[BackboneSpec]:
        names = [b.name for b in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backbone names must be unique: {dupes}")
        return v

    @model_validator(mode="after")
    def _losses_fit_the_task(self) -> "Experiment":
        if self.task.generates:
            return self._generate_backbones()
        if isinstance(self.classical, list):
            clash = sorted(set(self.classical) & {b.name for b in self.backbones})
            if clash or len(set(self.classical)) < len(self.classical):
                raise ValueError(f"classical: {self.classical}: each member once, and no backbone of the same name "
                                 f"({clash or 'listed twice'})")
        for b in self.backbones:
            if mode_of(b).generate_only or b.retrieve:
                raise ValueError(f"backbone {b.name}: {'mode ' + b.mode if mode_of(b).generate_only else 'retrieve'} is "
                                 f"for generate tasks; task {self.task.name} classifies")
            if self.task.multi_label and b.loss == "ce":
                raise ValueError(f"backbone {b.name}: loss ce is for single-label tasks; task {self.task.name} is "
                                 "multi-label (use bce, asl or auto)")
            if not self.task.multi_label and b.loss in ("bce", "asl"):
                raise ValueError(f"backbone {b.name}: loss {b.loss} is for multi-label tasks; task {self.task.name} is "
                                 "single-label (use ce or auto)")
        return self

    def _generate_backbones(self) -> "Experiment":
        """A generate task's backbones are causal LMs that read the prompt as it is (no target markers)."""
        if isinstance(self.classical, list):
            raise ValueError(f"classical: {self.classical} are classify members; a generate task's classical member "
                             "is retrieval (classical: true or false)")
        for b in self.backbones:
            if b.family != "decoder":
                raise ValueError(f"backbone {b.name}: a generate task needs a decoder (causal LM); {b.checkpoint} is an encoder")
            b.target_encoding = "none"
            b.max_new_tokens = b.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        return self

    @property
    def layout(self) -> Layout:
        return Layout(self.results)

    def backbone(self, name: str) -> BackboneSpec:
        for b in self.backbones:
            if b.name == name:
                return b
        raise KeyError(f"no backbone named {name!r}; have {[b.name for b in self.backbones]}")

    def with_backbones(self, backbones: list[BackboneSpec]) -> "Experiment":
        return self.model_copy(update={"backbones": backbones})


def _format_validation(e: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid experiment:"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def _resolve(base: Path, p: Any) -> Any:
    if isinstance(p, str) and p and not p.startswith("tiny:") and not Path(p).is_absolute():
        cand = (base / p)
        # hub ids ("org/name") stay as they are unless such a folder exists locally
        if p.startswith(".") or cand.exists() or p.count("/") != 1:
            return str(cand.resolve())
    return p


def parse_experiment(raw: dict, base_dir: str | Path = ".", where: str = "<experiment>") -> Experiment:
    """Validate a raw experiment mapping. Nothing is built or written."""
    base = Path(base_dir).resolve()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    raw = dict(raw)
    if isinstance(raw.get("train"), (str, Path)):
        raw["train"] = [raw["train"]]
    raw["train"] = [_resolve(base, p) for p in raw.get("train", [])]
    if raw.get("test"):
        raw["test"] = _resolve(base, str(raw["test"]))
    # results is an output place: relative to where the command runs, not to the YAML file
    raw["results"] = str(Path(raw.get("results") or "results").expanduser().resolve())
    raw["search_spaces"] = {k: _resolve(base, v) for k, v in (raw.get("search_spaces") or {}).items()}
    if isinstance(raw.get("distill"), dict) and raw["distill"].get("pool"):
        raw["distill"] = {**raw["distill"], "pool": [_resolve(base, str(p)) for p in raw["distill"]["pool"]]}
    defaults = raw.pop("defaults", None) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: defaults: expected a mapping")
    backbones, pinned = [], {}
    for i, b in enumerate(raw.get("backbones") or []):
        if not isinstance(b, dict):
            raise ConfigError(f"{where}: backbones.{i}: expected a mapping")
        pinned[str(b.get("name"))] = sorted(k for k in b if k not in ("name", "checkpoint"))
        b = {**defaults, **b}
        if "checkpoint" in b:
            b["checkpoint"] = _resolve(base, b["checkpoint"])
        if isinstance(b.get("pretrain"), dict) and isinstance(b["pretrain"].get("corpus"), list):
            b["pretrain"] = {**b["pretrain"], "corpus": [
                {**c, "path": _resolve(base, str(c.get("path")))} if isinstance(c, dict) else _resolve(base, str(c))
                for c in b["pretrain"]["corpus"]]}
        backbones.append(b)
    # a run's saved experiment (run.py) is read back with the keys its backbones set at first
    raw["backbones"], raw["pinned"] = backbones, raw.get("pinned", pinned)
    try:
        exp = Experiment(**raw)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, where)) from None
    missing = [str(p) for p in exp.train + ([exp.test] if exp.test else []) if not p.exists()]
    if missing:
        raise ConfigError(f"{where}: data file(s) not found: {missing}")
    return exp


def load_experiment(path: str | Path, overrides: dict | None = None) -> Experiment:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"experiment file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    raw = {**(raw or {}), **(overrides or {})}
    return parse_experiment(raw, path.parent, str(path))
