"""The stages as functions of a Run (nikl_ray.run.open_run), and all of them in order:

    split → (pretrain) → (tune) → train → features → ensemble → submit  (→ distill, on its own)

Each stage reads the artifacts of the stages before it (through the run's Layout), writes its
own with a manifest, skips itself when that manifest matches, and resumes when it was cut off.
A stage reads `run.exp` when it starts, so it runs on whatever pretraining and searches have
finished by then, whichever command or job ran them. Ray must be connected first
(`nikl_ray.run.connect`) for every stage but `split`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nikl_ray.artifacts import read_json
from nikl_ray.run import Run

log = logging.getLogger(__name__)


def split(run: Run) -> dict:
    """The fold manifest (made when the run was opened; made again if the rows changed since)."""
    from nikl_ray.stages import split as stage

    return stage.run(run.config, run.inputs.rows)


def pretrain(run: Run, backbones: list[str] | None = None) -> dict[str, Path]:
    """Continue pretraining every backbone with a `pretrain:` section; {backbone: its checkpoint}."""
    from nikl_ray.stages import pretrain as stage

    return stage.run(run.build().config, backbones=backbones)  # from the checkpoints as written, never from its own output


def searched(run: Run) -> list[str]:
    """The backbones a search is configured for (`search_spaces:`): what `pipeline --tune` searches."""
    return list(run.config.search_spaces)


def to_tune(run: Run, asked: list[str] | None = None) -> list[str]:
    """What `nikl-ray tune` and the tune job search: the backbones asked for, else those with a search
    space, else every backbone (each in its family's default space)."""
    return asked or searched(run) or [b.name for b in run.config.backbones]


def tune(run: Run, backbone: str, *, space: str | Path | None = None, **search) -> Path:
    """Search `backbone`'s space (`search` overrides the experiment's `search:` keys, validated as they
    are); its best_config.yaml."""
    from nikl_ray.config import SearchConfig
    from nikl_ray.stages import tune as stage

    exp = run.build().untuned  # a search starts from the experiment's own values
    given = {k: v for k, v in search.items() if v is not None}
    exp = exp.model_copy(update={"search": SearchConfig(**{**exp.search.model_dump(), **given})})
    return stage.run(exp, run.inputs, backbone, space_path=space)


def train(run: Run, backbones: list[str] | None = None) -> Path:
    """Train every fold × backbone not done yet; the train table."""
    from nikl_ray.stages import train as stage

    run = run.build()
    return stage.run(run.exp, run.inputs, backbones=backbones)


def features(run: Run) -> Path:
    """Every fold model's out-of-fold and test features; the features root."""
    from nikl_ray.stages import features as stage

    run = run.build()
    return stage.run(run.exp, run.inputs)


def ensemble(run: Run) -> Path:
    """The heads, every candidate compared, the report, the submission and the run's record; the report."""
    from nikl_ray.stages import ensemble as stage

    run = run.build()
    return stage.run(run.exp, run.inputs)


def distill(run: Run, *, student: str | None = None, pool: list[str | Path] | None = None) -> Path:
    """One student trained on the finished ensemble's probabilities, scored out of fold beside it and
    exported for CPU (its backbone and pool default to the experiment's `distill:`); its report."""
    from nikl_ray.stages import distill as stage

    run = run.build()
    return stage.run(run.exp, run.inputs, student=student, pool=[Path(p) for p in pool] if pool else None)


class Clock:
    """Logs each stage's header and keeps its wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kw):
        log.info("=== %s ===", name)
        t0 = time.time()
        out = fn(*args, **kw)
        self.seconds[name] = time.time() - t0
        return out


def pipeline(run: Run, *, tune_first: bool = False) -> dict:
    """Every stage in order (searches first with `tune_first`); where things are and each stage's time."""
    clock, run = Clock(), run.build()
    clock("split", split, run)
    if any(b.pretrain for b in run.config.backbones):
        clock("pretrain", pretrain, run)
    if tune_first:
        for name in searched(run):
            clock(f"tune {name}", tune, run, name)
    summary = clock("train", train, run)
    clock("features", features, run)
    report = clock("ensemble", ensemble, run)
    layout, scores = run.layout, read_json(run.layout.report_json)
    out = {"results": run.results, "train_summary": summary, "report": report, "plot": layout.report_plot,
           "submission": layout.submission(run.config.task.suffix) if run.inputs.test is not None else None,
           "chosen": scores["chosen"]["name"], "stage_seconds": clock.seconds}
    log_summary(out, scores)
    return out


def log_summary(out: dict, report: dict) -> None:
    c, metric = report["chosen"], report["metric"]
    lines = ["=== summary ===",
             "stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in out["stage_seconds"].items()),
             f"submitted: {c['name']} (rule {c['rule']}), cross-fitted out-of-fold {metric} {c['score']:.4f}; "
             f"best single member {c['best_member']} {c['best_member_score']:.4f}",
             f"report: {out['report']}", f"plot: {out['plot']}", f"train table: {out['train_summary']}"]
    if report["degenerate"]:
        lines.append("DEGENERATE fold models (left out of every ensemble): "
                     + "; ".join(f"{m}: {', '.join(r)}" for m, r in report["degenerate"].items()))
    if out["submission"]:
        lines.append(f"submission: {out['submission']}")
    log.info("\n".join(lines))
