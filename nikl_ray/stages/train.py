"""The train stage: every (backbone, fold) pair is one Ray Train run of an HF Trainer.

    nikl-ray train --config examples/tiny.yaml --local       # this machine
    ray job submit --working-dir . -- python ray_jobs/train_folds.py --config …   # a cluster

Each run is a FoldRun (runspec) placed by the plan: a 1/k card share, or CPUs on a CPU machine.
Ray runs as many at once as the cluster holds. A run picks its epoch on its fold's selection
slice, scores its held-out fold once at the end and writes its features from the model in hand
(nikl_ray/handoff.py: the features stage takes them). A pair whose manifest matches is skipped;
an interrupted pair resumes from its last checkpoint. The table (`train/summary.md`) shows each run's selection and
held-out scores and flags degenerate models loudly.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nikl_ray.artifacts import fresh_run_dir, load_manifest, manifest_problem, write_json, write_manifest
from nikl_ray.backbones import BackboneSpec
from nikl_ray.config import Experiment
from nikl_ray.folds import fold_positions
from nikl_ray.inputs import Inputs
from nikl_ray.metrics import task_metric
from nikl_ray import handoff
from nikl_ray.runfiles import HF_CHECKPOINT, read_history
from nikl_ray.runspec import (SELECT_METRIC, FoldRun, answering_positions, best_evaluated, final_run, held_out_hash,
                              payload_of)
from nikl_ray.tables import markdown, write_table
from nikl_ray.tracking import target

log = logging.getLogger(__name__)


def pair_inputs(exp: Experiment, spec: BackboneSpec, fold: int, folds: dict) -> dict:
    return {"backbone": spec.model_dump(mode="json"), "task": exp.task.model_dump(mode="json"), "fold": fold,
            "held_out_hash": held_out_hash(folds, fold), "data_hash": folds["data_hash"]}


def summarize(run: FoldRun, out: dict) -> dict:
    """What the manifest keeps of a finished run: its epochs, scores, losses and clocks."""
    metric = task_metric(run.task)
    history = read_history(out["latest_checkpoint"])
    evals = [h for h in history if SELECT_METRIC in h]
    best = best_evaluated(history)
    epochs = [h for h in history if "loss" in h and "eval_loss" not in h]
    final = out["metrics"]
    return {"best_epoch": int(round(best["epoch"])) if best else len(epochs), "epochs_run": len(evals) or len(epochs),
            "selection_score": best[SELECT_METRIC] if best else None,
            f"heldout_{metric}": final.get(f"heldout_{metric}"), "heldout_macro_f1": final.get("heldout_macro_f1"),
            "degenerate": final.get("degenerate"), "train_losses": [h["loss"] for h in epochs],
            "train_fn_seconds": final.get("train_fn_seconds"), "wall_seconds": out["wall_seconds"],
            "peak_gpu_gb": max((h.get("peak_gpu_gb", 0) for h in history), default=None) or None}


def run(exp: Experiment, data: Inputs, *, backbones: list[str] | None = None) -> Path:
    """Train every (backbone, fold) pair not already done; write the table. Returns its path."""
    import ray

    from nikl_ray.cluster import plan_stage

    layout, folds = exp.layout, data.folds(exp)
    specs = [s for s in exp.backbones if backbones is None or s.name in backbones]
    stage = plan_stage(exp, specs)
    log.info("%s", stage.describe())
    payload = ray.put(payload_of(data.rows, data.test))
    answering = answering_positions(data.test, folds["k"])
    test_hash = data.test.data_hash() if data.test is not None else None
    runs, status, tracking = [], {}, None
    for spec in specs:
        for fold in range(folds["k"]):
            inputs = pair_inputs(exp, spec, fold, folds)
            if manifest_problem(layout.pair(spec.name, fold), inputs, __name__) is None:
                status[layout.run_name(spec.name, fold)] = "skipped (done)"
                continue
            tracking = tracking or target(exp, "train")
            runs.append((final_run(exp, spec, fold, fold_positions(data.rows, folds, fold), payload,
                                   stage.placements[spec.name], stage.device,
                                   handoff.order(layout, spec.name, fold, answering[fold], test_hash), tracking), inputs))
    failures = fit(runs, lambda r: stage.slots_of(r.backbone.name), status, "train")
    path = write_summary(exp, specs, folds["k"], status) if len(failures) < len(status) else None
    if failures:
        raise RuntimeError("some training runs failed (finished runs are kept; rerun to retry):\n  " + "\n  ".join(failures))
    return path


def fit(runs: list[tuple[FoldRun, dict]], slots_of, status: dict, what: str) -> list[str]:
    """Train each (run, its inputs) as one Ray Train run, as many at once as the plan's slots allow
    (a run in a folder made for other inputs starts over; one cut off resumes from its checkpoint).
    A finished run's manifest vouches for its best checkpoint; `status[run.name]` says how each
    ended. Returns the failures, one line each (the others' work is kept)."""
    from nikl_ray.launcher import run_all

    inputs_of = {}
    for run, inputs in runs:
        log.info("%s %s: %s → training", what, run.name, manifest_problem(run_dir(run), inputs, __name__))
        fresh_run_dir(run_dir(run), inputs, __name__)
        inputs_of[run.name] = inputs
    failures = []

    def done(run: FoldRun, out: dict) -> None:
        d, best = run_dir(run), Path(out["best_checkpoint"])
        summary = summarize(run, out)
        vouched = [f for f in (best / HF_CHECKPOINT).iterdir() if f.suffix in (".safetensors", ".json")]
        write_manifest(d, inputs=inputs_of[run.name], files=vouched, code=__name__,
                       extra={"best_checkpoint": str(best.relative_to(d.resolve()) / HF_CHECKPOINT), **summary})
        (d / "failed.json").unlink(missing_ok=True)
        status[run.name] = "trained"
        metric = task_metric(run.task)
        held = summary[f"heldout_{metric}"]
        line = (f"{what} {run.name}: " + (f"held-out {metric} {held:.4f} " if held is not None else "")
                + f"(epoch {summary['best_epoch']} of {summary['epochs_run']}, {out['wall_seconds']:.0f} s)")
        if summary["degenerate"]:
            log.warning("%s — DEGENERATE: %s", line, summary["degenerate"])
        else:
            log.info("%s", line)

    def failed(run: FoldRun, e: Exception) -> None:
        write_json(run_dir(run) / "failed.json", {"error": str(e).splitlines()[0][:500]})
        failures.append(f"{run.name}: {e}")
        status[run.name] = "failed"
        log.error("%s %s: FAILED: %s", what, run.name, e)

    run_all([r for r, _ in runs], slots_of, done, failed)
    return failures


def run_dir(run: FoldRun) -> Path:
    """Where Ray Train keeps the run (its checkpoints) and the stage its manifest."""
    return Path(run.storage) / run.name


def write_summary(exp: Experiment, specs: list[BackboneSpec], k: int, status: dict) -> Path:
    metric = task_metric(exp.task)
    rows = []
    for spec in specs:
        for fold in range(k):
            name = exp.layout.run_name(spec.name, fold)
            if status.get(name, "failed") == "failed":
                continue
            m = load_manifest(exp.layout.pair(spec.name, fold))
            rows.append({"backbone": spec.name, "fold": fold, "mode": spec.mode, "best_epoch": m["best_epoch"],
                         "epochs_run": m["epochs_run"], "selection score": m.get("selection_score"),
                         f"held-out {metric}": m.get(f"heldout_{metric}"), "wall_seconds": m["wall_seconds"],
                         "status": status[name] + (f" — DEGENERATE: {m['degenerate']}" if m.get("degenerate") else "")})
    if not rows:
        raise RuntimeError("no finished training runs to summarize")
    path = write_table(exp.layout.train_summary, rows)
    log.info("train table (%s):\n%s", path.with_suffix(".md"), markdown(rows))
    return path
