"""A run: the one way into the stages, and the one place their setup order lives.

    run = open_run("my.yaml")          # parsed, rows validated, folds, tiny backbones built
    connect(run, local=True)           # Ray: a separate, explicit step
    train(run); features(run); ensemble(run)

`open_run` reads the experiment (a YAML path, a raw mapping or a parsed `Experiment`), reads
and validates its rows, makes (or reuses) the folds and builds the tiny `tiny:<kind>`
checkpoints (random-init, a tokenizer trained on the task's training text, or on a pretraining
backbone's corpus). What finished pretraining and tuning give is applied each time a stage
reads `run.exp`, so a stage never starts a backbone from a checkpoint that has been pretrained
since, nor with values a search has since replaced; `run.untuned` is what a search starts from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nikl_ray.backbones import BackboneSpec
from nikl_ray.config import ConfigError, Experiment, load_experiment, parse_experiment
from nikl_ray.inputs import Inputs, load_inputs
from nikl_ray.layout import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    config: Experiment  # as written (paths resolved; tiny checkpoints built when the run was opened to build)
    inputs: Inputs
    folds: dict | None  # the split stage's fold manifest (None when opened without writing)
    _resolved: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def layout(self) -> Layout:
        return self.config.layout

    @property
    def results(self) -> Path:
        return self.config.results

    @property
    def exp(self) -> Experiment:
        """The experiment the stages run: finished pretraining and tuned values applied."""
        return self._current(tuned=True)

    @property
    def untuned(self) -> Experiment:
        """What a search starts from: pretraining applied, the experiment's own values."""
        return self._current(tuned=False)

    def build(self) -> "Run":
        """The run with its folds made (or reused) and its tiny backbones built: what the stages need."""
        if self.folds is not None:
            return self
        from nikl_ray.artifacts import write_json
        from nikl_ray.stages import split

        folds = split.run(self.config, self.inputs.rows)
        write_json(self.layout.experiment, self.config.model_dump(mode="json"))
        return Run(build_tiny(self.config, self.inputs), self.inputs, folds)

    def _current(self, *, tuned: bool) -> Experiment:
        key = (tuned, _finished_state(self.config))
        if key not in self._resolved:  # resolved again only once pretraining or a search finishes
            exp = apply_pretrained(self.config)
            self._resolved[key] = apply_tuned(exp) if tuned else exp
        return self._resolved[key]


def open_run(config: str | Path | dict | Experiment | None, results: str | Path | None = None, *,
             build: bool = True) -> Run:
    """The run of an experiment: its rows validated, its folds made or reused, its tiny backbones
    built. `results` overrides the experiment's results root; without `config`, the run opened
    there before is reopened (its `experiment.json`). With `build=False` nothing is
    written (no folds, no tiny checkpoints) until `run.build()`: what `validate` and `status` need,
    and commands that join a cluster, which first check that every node sees the results root."""
    exp = _experiment(config, results)
    run = Run(exp, load_inputs(exp), None)
    return run.build() if build else run


def connect(run: Run | None = None, *, local: bool = False, num_cpus: int | None = None,
            num_gpus: int | None = None) -> None:
    """Start (`local`) or join Ray; with a run, check that every node sees its results root and note
    the dashboard there (for `nikl-ray status` in another shell)."""
    from nikl_ray.cluster import check_shared_storage, dashboard_url
    from nikl_ray.cluster import connect as connect_ray
    from nikl_ray.status import record_dashboard

    connect_ray(local=local, num_cpus=num_cpus, num_gpus=num_gpus)
    if run is not None:
        check_shared_storage(run.results)
        record_dashboard(run.layout, dashboard_url())


def _experiment(config, results) -> Experiment:
    if config is None:
        saved = Layout(results or "results").experiment
        if not saved.exists():
            raise ConfigError(f"{saved.parent} holds no run opened before ({saved.name} is missing): give the "
                              "experiment (--config)")
        return parse_experiment(json.loads(saved.read_text(encoding="utf-8")), saved.parent, str(saved))
    overrides = {"results": str(results)} if results else None
    if isinstance(config, Experiment):
        return config.model_copy(update={"results": Path(results).expanduser().resolve()}) if results else config
    if isinstance(config, dict):
        return parse_experiment({**config, **(overrides or {})})
    return load_experiment(config, overrides)


def _finished_state(exp: Experiment) -> tuple:
    """What decides the experiment the stages run: which pretraining and searches have finished, and when."""
    paths = [exp.layout.manifest(exp.layout.pretrain(b.name)) for b in exp.backbones if b.pretrain]
    paths += [exp.layout.best_config(b.name) for b in exp.backbones]
    return tuple(p.stat().st_mtime_ns if p.exists() else None for p in paths)


# ---------------------------------------------------------------------------- the setup steps
def build_tiny(exp: Experiment, inputs: Inputs) -> Experiment:
    """Build (once) the tiny random-init checkpoints `tiny:<kind>` backbones name; point the specs at
    them. The tokenizer is trained on the task's training text, or, for a backbone that pretrains,
    on its pretraining corpus (a checkpoint of its own)."""
    from nikl_ray.corpus import corpus_hash, pretrain_corpus
    from nikl_ray.tiny import TINY_KINDS, make_tiny_backbone

    specs = []
    for spec in exp.backbones:
        if spec.checkpoint.startswith("tiny:"):
            kind = spec.checkpoint.removeprefix("tiny:")
            if kind not in TINY_KINDS:
                raise ConfigError(f"backbone {spec.name}: unknown tiny kind {kind!r}; choose from {TINY_KINDS}")
            corpus = corpus_hash(spec.pretrain.corpus) if spec.pretrain else None
            out = exp.layout.tiny(f"{kind}-{corpus[:10]}" if corpus else kind)
            if not (out / "config.json").exists():
                # a generate task's tokenizer also learns its answers' text, which a corpus of questions lacks
                texts = ((pretrain_corpus(exp, spec)[0] if corpus else [])
                         + (task_texts(inputs.rows) if exp.task.generates or not corpus else []))
                log.info("building tiny %s backbone in %s (tokenizer trained on %d texts)", kind, out, len(texts))
                make_tiny_backbone(kind, texts, out)
            spec = spec.model_copy(update={"checkpoint": str(out)})
        specs.append(spec)
    return exp.with_backbones(specs)


def task_texts(rows) -> list[str]:
    """The training text a tiny backbone's tokenizer learns: the rows' texts, or a generate task's
    questions, contexts and reference answers."""
    if not rows.task.generates:
        return rows.texts
    return [t for i in range(len(rows)) for t in (*rows.questions[i], rows.contexts[i] or "", *rows.answers[i]) if t]


def apply_pretrained(exp: Experiment) -> Experiment:
    """Backbones whose pretraining finished start from its checkpoint."""
    specs = []
    for spec in exp.backbones:
        done = spec.pretrain and exp.layout.manifest(exp.layout.pretrain(spec.name)).exists()
        specs.append(spec.model_copy(update={"checkpoint": str(exp.layout.pretrained(spec.name))}) if done else spec)
    return exp.with_backbones(specs)


def tuned_values(layout: Layout, backbone: str) -> dict:
    """The best config `nikl-ray tune` wrote for `backbone`, or {}."""
    path = layout.best_config(backbone)
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}


def apply_tuned(exp: Experiment) -> Experiment:
    """Every backbone with a finished search takes its tuned values (a pinned key is overridden, loudly)."""
    specs = []
    for spec in exp.backbones:
        best = tuned_values(exp.layout, spec.name)
        if best:
            clash = {k: getattr(spec, k) for k in best if k in exp.pinned.get(spec.name, []) and getattr(spec, k) != best[k]}
            for k, v in clash.items():
                log.warning("%s: the experiment pins %s=%s, the search it runs chose %s: the tuned value wins "
                            "(remove %s from the search space to keep yours)", spec.name, k, v, best[k], k)
            log.info("%s: using tuned %s", spec.name, best)
            spec = BackboneSpec(**{**spec.model_dump(), **best})
        specs.append(spec)
    return exp.with_backbones(specs)
