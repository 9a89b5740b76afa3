"""Experiment files: one YAML that says what to train on, with which backbones, and where to write.

Relative paths are taken from the YAML file's folder. `defaults` applies to every backbone
(each backbone's own keys win). A checkpoint written `tiny:<kind>` (electra, roberta, bert,
gpt_neox, llama) is a tiny random-init backbone built on first use under
`<results>/tiny_backbones/<kind>` with a tokenizer trained on the task's training text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from nikl_ray.backbones import BackboneSpec
from nikl_ray.tasks import TaskSpec, get_task


class ConfigError(ValueError):
    pass


class FoldsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(5, ge=2, le=20, description="Number of folds.")
    seed: int = Field(42, description="Seed of the stratified split.")


class ResourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    use_gpu: bool | None = Field(None, description="Train on GPUs; default: when the cluster has any.")
    card_gb: float = Field(24.0, gt=0, description="Memory of one card, for the placement plan.")
    max_trials_per_card: int = Field(8, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs each trial's worker holds.")
    max_failures: int = Field(2, ge=0, description="Times Ray Train restarts a failed run from its last checkpoint.")


class EnsembleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_sizes: list[int] = Field([64, 96, 128, 256, 512], min_length=1, description="MLP head hidden sizes; one head each.")
    inner_folds: int = Field(5, ge=2, description="Inner K-fold of the heads over the out-of-fold features.")
    epochs: int = Field(200, ge=1, description="Maximum epochs of a head (early stopping on inner micro-F1).")
    patience: int = Field(20, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    use_hidden: bool = Field(True, description="Stack the members' pooled hidden states too, not only their probabilities.")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: TaskSpec = Field(description="A built-in task name or a task mapping.")
    train: list[Path] = Field(min_length=1, description="Labelled data files (folds are made over all of them).")
    test: Path | None = Field(None, description="Unlabelled rows to predict and submit.")
    results: Path = Field(Path("results"), description="Results root.")
    folds: FoldsConfig = FoldsConfig()
    backbones: list[BackboneSpec] = Field(min_length=1)
    classical: bool = Field(True, description="Add the char n-gram TF-IDF + logistic-regression member.")
    resources: ResourcesConfig = ResourcesConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    search_spaces: dict[str, Path] = Field({}, description="Backbone name → search space YAML for `tune`.")
    _source: tuple = PrivateAttr(default=())  # (raw mapping, base folder, name) to re-read after tuning

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

    def backbone(self, name: str) -> BackboneSpec:
        for b in self.backbones:
            if b.name == name:
                return b
        raise KeyError(f"no backbone named {name!r}; have {[b.name for b in self.backbones]}")


def _format_validation(e: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid experiment:"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _resolve(base: Path, p: Any) -> Any:
    if isinstance(p, str) and p and not p.startswith("tiny:") and not Path(p).is_absolute():
        cand = (base / p)
        # hub ids ("org/name") stay as they are unless such a folder exists locally
        if p.startswith(".") or cand.exists() or p.count("/") != 1:
            return str(cand.resolve())
    return p


def parse_experiment(raw: dict, base_dir: str | Path = ".", where: str = "<experiment>") -> Experiment:
    """Validate a raw experiment mapping; tiny:<kind> checkpoints are built if missing."""
    base = Path(base_dir).resolve()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    source, raw = raw, dict(raw)
    if isinstance(raw.get("train"), (str, Path)):
        raw["train"] = [raw["train"]]
    raw["train"] = [_resolve(base, p) for p in raw.get("train", [])]
    if raw.get("test"):
        raw["test"] = _resolve(base, str(raw["test"]))
    # results is an output place: relative to where the command runs, not to the YAML file
    raw["results"] = str(Path(raw.get("results") or "results").expanduser().resolve())
    raw["search_spaces"] = {k: _resolve(base, v) for k, v in (raw.get("search_spaces") or {}).items()}
    defaults = raw.pop("defaults", None) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: defaults: expected a mapping")
    backbones = []
    results = Path(raw["results"])
    for i, b in enumerate(raw.get("backbones") or []):
        if not isinstance(b, dict):
            raise ConfigError(f"{where}: backbones.{i}: expected a mapping")
        # precedence: the backbone's own keys > its tuned best config > the file's defaults
        b = {**defaults, **tuned_config(results, b.get("name")), **b}
        if "checkpoint" in b:
            b["checkpoint"] = _resolve(base, b["checkpoint"])
        backbones.append(b)
    raw["backbones"] = backbones
    exp = _validate(raw, where)
    tiny = [b for b in backbones if str(b.get("checkpoint", "")).startswith("tiny:")]
    if tiny:
        _build_tiny(raw, tiny, where)
        exp = _validate(raw, where)
    missing = [str(p) for p in exp.train + ([exp.test] if exp.test else []) if not p.exists()]
    if missing:
        raise ConfigError(f"{where}: data file(s) not found: {missing}")
    exp._source = (source, base, where)
    return exp


def tuned_config(results: Path, backbone: Any) -> dict:
    """The best config `nikl-ray tune` wrote for `backbone`, or {}."""
    path = results / "tune" / str(backbone) / "best_config.yaml"
    if not isinstance(backbone, str) or not path.exists():
        return {}
    best = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    print(f"{backbone}: using tuned {best} from {path}", flush=True)
    return best


def reload_experiment(exp: Experiment) -> Experiment:
    """Read the experiment again (after tuning, so best configs apply)."""
    raw, base, where = exp._source
    return parse_experiment(raw, base, where)


def _validate(raw: dict, where: str) -> Experiment:
    try:
        return Experiment(**raw)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, where)) from None


def _build_tiny(raw: dict, tiny: list[dict], where: str) -> None:
    from nikl_ray.data import read_rows
    from nikl_ray.tiny import TINY_KINDS, make_tiny_backbone

    task = get_task(raw.get("task"))
    results = Path(raw.get("results") or "results")
    texts = None
    for b in tiny:
        kind = b["checkpoint"].removeprefix("tiny:")
        if kind not in TINY_KINDS:
            raise ConfigError(f"{where}: backbone {b.get('name')}: unknown tiny kind {kind!r}; choose from {TINY_KINDS}")
        out = results / "tiny_backbones" / kind
        if not (out / "config.json").exists():
            if texts is None:
                texts = read_rows(raw["train"], task).texts
            print(f"building tiny {kind} backbone in {out} (tokenizer trained on {len(texts)} rows)", flush=True)
            make_tiny_backbone(kind, texts, out)
        b["checkpoint"] = str(out.resolve())


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
