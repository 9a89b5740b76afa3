"""Search-space files: YAML mappings of backbone field → one distribution, validated by pydantic.

    lora_r: {choice: [8, 16, 32, 64]}
    lr: {loguniform: {low: 1.0e-5, high: 5.0e-3}}
    lora_dropout: {uniform: {low: 0.0, high: 0.15}}
    epochs: {randint: {low: 2, high: 6}}          # high exclusive

Every problem is reported at once, with its key; every edge of the space must make a valid backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from nikl_ray.backbones import BackboneSpec
from nikl_ray.config import ConfigError
from nikl_ray.modes import mode_of

SEARCH_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
NOT_SEARCHABLE = {"name", "checkpoint", "family", "mode", "trust_remote_code", "params"}
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
MEMORY_KEYS = ("lora_r", "batch_size", "max_length", "prompt_tokens", "prefix_tokens", "max_new_tokens")  # what moves a trial's memory footprint


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float
    high: float


class Distribution(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: list[Any] | None = None
    uniform: Range | None = None
    loguniform: Range | None = None
    randint: Range | None = None

    @model_validator(mode="after")
    def _one(self) -> "Distribution":
        given = [d for d in DISTRIBUTIONS if getattr(self, d) is not None]
        if len(given) != 1:
            raise ValueError(f"expected one of {{{', '.join(DISTRIBUTIONS)}: …}}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs a non-empty list")
        r = self.uniform or self.loguniform or self.randint
        if r is not None and (not r.low < r.high or (self.loguniform is not None and r.low <= 0)):
            raise ValueError(f"{given[0]} range [{r.low:g}, {r.high:g}] is empty or not positive")
        return self

    @property
    def kind(self) -> str:
        return next(d for d in DISTRIBUTIONS if getattr(self, d) is not None)

    def edges(self) -> list:
        if self.choice is not None:
            return list(self.choice)
        r = getattr(self, self.kind)
        return [int(r.low), int(r.high) - 1] if self.kind == "randint" else [r.low, r.high]

    def to_tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        r = getattr(self, self.kind)
        if self.kind == "randint":
            return tune.randint(int(r.low), int(r.high))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform}[self.kind](r.low, r.high)


def _message(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown distribution {where!r}: expected one of {', '.join(DISTRIBUTIONS)}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def default_space_path(spec: BackboneSpec, task=None) -> Path:
    """search_spaces/<family>_<mode's space>.yaml; a generate task's: search_spaces/qa_<mode's space>.yaml."""
    if task is not None and task.generates:
        return SEARCH_SPACES / f"qa_{mode_of(spec).search_space}.yaml"
    return SEARCH_SPACES / f"{spec.family}_{mode_of(spec).search_space}.yaml"


def load_search_space(path: str | Path, base: BackboneSpec) -> dict[str, Distribution]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"search space {path} not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of backbone field → distribution")
    space, problems = {}, []
    for key, dist in raw.items():
        if key not in BackboneSpec.model_fields or key in NOT_SEARCHABLE:
            problems.append(f"{key}: not a searchable backbone field")
            continue
        try:
            space[key] = Distribution.model_validate(dist)
        except ValidationError as e:
            problems.append(f"{key}: " + "; ".join(_message(err) for err in e.errors()))
            continue
        for value in space[key].edges():  # every edge of the space must make a valid backbone
            try:
                BackboneSpec(**{**base.model_dump(), key: value})
            except ValidationError as e:
                problems.append(f"{key}: value {value!r} is invalid: {e.errors()[0]['msg']}")
    if problems:
        raise ConfigError(f"{path}: bad search space:\n  " + "\n  ".join(problems))
    return space


def memory_corner(base: BackboneSpec, space: dict[str, Distribution]) -> BackboneSpec:
    """The most memory-hungry backbone the search can try (what its placement is planned for)."""
    worst = {k: max(d.edges()) for k, d in space.items() if k in MEMORY_KEYS}
    return BackboneSpec(**{**base.model_dump(), **worst}) if worst else base
