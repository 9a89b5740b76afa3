"""The stages in order, each skipped when its manifest is complete: one entry for the CLI and the ray jobs.

    split → (pretrain) → (tune) → train → features → ensemble → submit

Every stage is `run(exp, data, …)` from nikl_ray.stages: it reads the artifacts of the stages
before it (through the experiment's Layout), writes its own with a manifest, skips itself when
that manifest matches, and resumes when it was cut off.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from nikl_ray.config import Experiment, apply_pretrained, apply_tuned, build_tiny
from nikl_ray.inputs import load_inputs

log = logging.getLogger(__name__)


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


def run_pipeline(exp: Experiment, *, tune: bool = False) -> dict:
    """Every stage in order; returns where things are and how long each stage took."""
    from nikl_ray.stages import ensemble, features, pretrain, split, train
    from nikl_ray.stages import tune as tune_stage

    clock = Clock()
    data = clock("load", load_inputs, exp)
    clock("split", split.run, exp, data.rows)
    exp = build_tiny(exp)
    if any(b.pretrain for b in exp.backbones):
        clock("pretrain", pretrain.run, exp)
    exp = apply_pretrained(exp)
    if tune:
        for spec in exp.backbones:
            if spec.name in exp.search_spaces:
                clock(f"tune {spec.name}", tune_stage.run, exp, data, spec.name)
    exp = apply_tuned(exp)
    summary = clock("train", train.run, exp, data)
    clock("features", features.run, exp, data)
    report = clock("ensemble", ensemble.run, exp, data)
    decision = json.loads(exp.layout.decision.read_text())
    out = {"results": exp.results, "train_summary": summary, "report": report, "plot": report.with_suffix(".png"),
           "submission": exp.layout.submission(ensemble.submission_suffix(exp)) if data.test is not None else None,
           "chosen": decision["candidate"], "stage_seconds": clock.seconds}
    log_summary(out)
    return out


def log_summary(out: dict) -> None:
    report = json.loads(Path(out["report"]).with_suffix(".json").read_text())
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
