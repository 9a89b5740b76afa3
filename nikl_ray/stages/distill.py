"""The distill stage: one small student learns the finished ensemble's probabilities, to serve alone.

    nikl-ray distill --config my.yaml --local            # after the ensemble stage
    Predictor.load(results, student=True)                 # "int8" / "onnx": its CPU forms
    nikl-ray serve --results results/nikl --student int8

The teacher is the run's submitted candidate; a labelled row's soft target is its out-of-fold
probabilities (ensemble/oof/), made by fold models that never saw that row's label. Rows of
`distill.pool` (or `--pool`), unlabelled and in the task's format, are answered by the finished
run first (Predictor): its probabilities are their targets, they train every student, and no
score is read on them. All students are Ray Train runs of the train stage's worker (`fit`):

1. **Cross-fitted**, one per fold of the run's split (`<student>-fold<k>`): it learns the targets of
   the other folds' rows, picks its epoch on the fold's selection slice and predicts its held-out
   fold. Those are the student's out-of-fold probabilities, scored beside the teacher's and every
   member's on the same rows, under the same rules cross-fitted over the same inner folds as the
   ensemble report (whose numbers the teacher's and members' rows repeat).
2. **Served** (`<student>`): every labelled row but fold 0's selection slice (which picks its
   epoch), plus the pool. Its rule is the one the cross-fitted probabilities chose, its
   parameters fitted on every row, as the ensemble does for test rows.
3. Its CPU forms (nikl_ray/export.py): ONNX and int8 ONNX, each checked against it.

A finished student is skipped when its manifest matches; a killed distillation resumes, each
run from its last checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from nikl_ray import handoff
from nikl_ray.artifacts import (load_manifest, manifest_problem, read_json, save_npy, sha256_file, write_json,
                                write_manifest, write_text)
from nikl_ray.backbones import BackboneSpec
from nikl_ray.config import ConfigError, Experiment
from nikl_ray.data import Rows, TextRows, read_rows
from nikl_ray.decision import best_rule, crossfit, score_rules
from nikl_ray.folds import fold_positions
from nikl_ray.inputs import Inputs
from nikl_ray.metrics import task_metric
from nikl_ray.runspec import FoldRun, RowsPayload, fold_run, held_out_hash
from nikl_ray.stages import train
from nikl_ray.stages.ensemble import read_oof, record_backbone
from nikl_ray.tables import markdown

log = logging.getLogger(__name__)
EXPORT_ROWS = 64  # training rows each exported form is checked on against the fp32 student


def student_spec(exp: Experiment, name: str | None = None, overrides: dict | None = None) -> BackboneSpec:
    """The student: backbone `name` (default the experiment's `distill.student`, else its first
    encoder, else its first backbone) as the run trained it, fine-tuned in full unless the
    overrides say otherwise, named `<name>-student`."""
    cfg = exp.distill
    name = name or cfg.student or next((b.name for b in exp.backbones if b.family == "encoder"), exp.backbones[0].name)
    base = exp.backbone(name)
    given = {**cfg.overrides, **(overrides or {})}
    try:
        return BackboneSpec(**{**base.model_dump(), "name": f"{name}-student", "mode": "full", **given})
    except ValidationError as e:
        raise ConfigError(f"distill: the student from backbone {name} with {given}: {e.errors()[0]['msg']}") from None


def run(exp: Experiment, data: Inputs, *, student: str | None = None, pool: list[Path] | None = None) -> Path:
    """Distill the finished run in `exp`'s results root into one student; its report's path."""
    import ray

    layout, rows, task = exp.layout, data.rows, exp.task
    if task.generates:
        raise ConfigError("distill: a generate task's answers are text; only classify runs distill")
    if not (layout.record.exists() and (layout.ensemble_oof / "rows.json").exists()):
        raise ConfigError(f"distill: no finished ensemble with its out-of-fold probabilities in {layout.ensemble}: "
                          "run (or rerun) the ensemble stage first")
    folds = data.folds(exp)
    ids, inner, oof = read_oof(layout.ensemble_oof)
    if ids != rows.ids:
        raise ConfigError(f"distill: {layout.ensemble} was made from other rows: rerun the ensemble stage first")
    teacher = read_json(layout.record)["decision"]["candidate"]
    spec = student_spec(exp, student)
    pool_rows = read_rows(pool if pool is not None else exp.distill.pool, task, labelled=False) \
        if (pool if pool is not None else exp.distill.pool) else None
    inputs = {"teacher": sha256_file(layout.manifest(layout.ensemble)), "student": spec.model_dump(mode="json"),
              "pool": pool_rows.data_hash() if pool_rows is not None else None, "data_hash": folds["data_hash"]}
    if manifest_problem(layout.distill, inputs, __name__) is None:
        log.info("distill: done already (%s)", layout.student_record)
        return layout.student_report

    pool_probs, pool_labels = label_pool(layout, pool_rows, inputs) if pool_rows is not None else (None, None)
    payload = ray.put(student_payload(rows, oof[teacher], pool_rows, pool_probs, pool_labels))
    from nikl_ray.cluster import plan_stage

    stage = plan_stage(exp, [spec])
    crossfitted, served = student_runs(exp, spec, stage, rows, folds, payload,
                                       len(pool_rows) if pool_rows is not None else 0)
    todo, status = [], {}
    for run_ in crossfitted + [served]:
        this = {**inputs, "task": task.model_dump(mode="json"), "run": run_.name,
                "held_out_hash": held_out_hash(folds, run_.fold)}
        if manifest_problem(train.run_dir(run_), this, train.__name__) is None:
            status[run_.name] = "skipped (done)"
        else:
            todo.append((run_, this))
    failures = train.fit(todo, lambda r: stage.slots_of(spec.name), status, "distill")
    if failures:
        raise RuntimeError("some student runs failed (finished runs are kept; rerun to retry):\n  " + "\n  ".join(failures))

    student_oof = out_of_fold(crossfitted, rows, len(task.labels), task.multi_label)
    scores, table = compare(student_oof, oof, teacher, rows.labels, inner, task.multi_label, task_metric(task))
    checkpoint = train.run_dir(served) / load_manifest(train.run_dir(served))["best_checkpoint"]
    from nikl_ray.export import export_student

    exports = export_student(spec, checkpoint, layout.student_export, rows.inputs().take(range(min(EXPORT_ROWS, len(rows)))),
                             task.multi_label, len(task.labels))
    s = scores["student"]
    record = {"name": spec.name, "backbone": record_backbone(exp, spec), "teacher": teacher,
              "checkpoint": checkpoint.resolve().relative_to(layout.root.resolve()).as_posix(),
              "rule": s["rule"], "params": s["params"], "exports": exports,
              "pool_rows": len(pool_rows) if pool_rows is not None else 0, "scores": {
                  n: {k: v for k, v in sc.items() if k != "params"} for n, sc in scores.items()}}
    report = {"metric": task_metric(task), "rows": len(rows), "table": table, **record}
    files = [write_json(layout.student_record, record), write_json(layout.distill / "report.json", report),
             write_text(layout.student_report, report_markdown(report)), save_npy(layout.distill / "oof.npy", student_oof)]
    files += [layout.distill / f["file"] for f in exports.values()]
    write_manifest(layout.distill, inputs=inputs, files=files, code=__name__)
    log.info("distill: %s — cross-fitted %s %.4f (rule %s), teacher %s %.4f; report %s", spec.name, task_metric(task),
             s["score"], s["rule"], teacher, scores[teacher]["score"], layout.student_report)
    return layout.student_report


def label_pool(layout, pool: Rows, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """The finished run's probabilities and decisions for the pool's rows (kept: relabelling a big
    pool costs what predicting it does)."""
    from nikl_ray.predictor import Predictor

    d, key = layout.distill / "pool", {"teacher": inputs["teacher"], "pool": inputs["pool"]}
    if manifest_problem(d, key, __name__) is None:
        return np.load(d / "probs.npy", allow_pickle=False), np.load(d / "labels.npy", allow_pickle=False)
    log.info("distill: the finished run labels %d pool rows", len(pool))
    out = Predictor.load(layout.root).predict(pool.inputs())
    files = [save_npy(d / "probs.npy", out.probs.astype(np.float32)), save_npy(d / "labels.npy", out.decisions.astype(np.int8))]
    write_manifest(d, inputs=key, files=files, code=__name__)
    return out.probs.astype(np.float32), out.decisions.astype(np.int8)


def student_payload(rows: Rows, soft: np.ndarray, pool: Rows | None, pool_probs, pool_labels) -> RowsPayload:
    """The labelled rows (then the pool's) with the teacher's probabilities as what they learn."""
    if pool is None:
        return RowsPayload(rows.ids, rows.inputs(), rows.labels, targets=soft.astype(np.float32))
    inputs, extra = rows.inputs(), pool.inputs()
    return RowsPayload(rows.ids + [f"pool:{i}" for i in pool.ids],
                       TextRows(inputs.texts + extra.texts, inputs.targets + extra.targets, inputs.spans + extra.spans),
                       np.vstack([rows.labels, pool_labels.astype(rows.labels.dtype)]),
                       targets=np.vstack([soft, pool_probs]).astype(np.float32))


def student_runs(exp: Experiment, spec: BackboneSpec, stage, rows: Rows, folds: dict, payload, n_pool: int
                 ) -> tuple[list[FoldRun], FoldRun]:
    """(one cross-fitted run per fold, the served run), placed by the stage's plan as the train stage
    places a backbone."""
    from nikl_ray.tracking import target

    layout = exp.layout
    storage, pool_idx = str(layout.distill / "runs"), np.arange(len(rows), len(rows) + n_pool)
    tracking = target(exp, "distill")

    def one(fold, positions, name, **kw):
        return fold_run(exp, spec, fold, positions, payload, stage.placements[spec.name], stage.device, name=name,
                        storage=storage, tracking=tracking, **kw)

    crossfitted = []
    for fold in range(folds["k"]):
        train_idx, select_idx, held_idx = fold_positions(rows, folds, fold)
        name = layout.run_name(spec.name, fold)
        order = handoff.FeatureOrder(str(Path(storage) / name / "features"), np.zeros(0, int), None)
        crossfitted.append(one(fold, (np.concatenate([train_idx, pool_idx]), select_idx, held_idx), name, features=order))
    train_idx, select_idx, held_idx = fold_positions(rows, folds, 0)
    served = one(0, (np.concatenate([np.sort(np.concatenate([train_idx, held_idx])), pool_idx]), select_idx,
                     np.zeros(0, int)), spec.name, predict_heldout=False)
    return crossfitted, served


def out_of_fold(runs: list[FoldRun], rows: Rows, n_labels: int, multi_label: bool) -> np.ndarray:
    """Each cross-fitted student's probabilities of its held-out fold: the ones its run wrote from its
    best weights, else one Ray task per fold reads them with its best checkpoint."""
    import ray

    from nikl_ray.stages.features import FeatureJob, neural_features

    out, pending = np.zeros((len(rows), n_labels), np.float32), {}
    for run_ in runs:
        d = train.run_dir(run_)
        best = d / load_manifest(d)["best_checkpoint"]
        held_ids = [rows.ids[i] for i in run_.heldout_idx]
        made = handoff.take(Path(run_.features.dir), best, held_ids, [], None)
        if made is not None:
            out[run_.heldout_idx] = made["oof"]["probs"]
            continue
        job = FeatureJob(run_.name, run_.fold, multi_label, n_labels, held_ids, rows.inputs().take(run_.heldout_idx), [],
                         TextRows([], [], []), run=run_, checkpoint=str(best))
        task = ray.remote(num_cpus=run_.placement.cpus, num_gpus=run_.placement.gpu_share)(neural_features)
        pending[task.options(name=f"distill {run_.name} out-of-fold").remote(job)] = run_
    for ref, run_ in pending.items():
        out[run_.heldout_idx] = ray.get(ref)["oof"]["probs"]
    return out


def compare(student: np.ndarray, oof: dict[str, np.ndarray], teacher: str, y: np.ndarray, inner: np.ndarray,
            multi_label: bool, metric: str) -> tuple[dict, list[dict]]:
    """Per model (the student, then the teacher and every other candidate of the ensemble): its best
    rule by cross-fitted score on the same rows and inner folds, that score and its parameters; and
    the table, with how often each model's decisions are the teacher's on a row."""
    models = {"student": student, teacher: oof[teacher], **{n: p for n, p in oof.items() if n != teacher}}
    scores, decisions = {}, {}
    for name, probs in models.items():
        by_rule = score_rules(probs, y, multi_label, inner)
        rule = best_rule(by_rule)
        scores[name] = {"rule": rule, "score": by_rule[rule]["crossfit"], "params": by_rule[rule]["params"]}
        decisions[name] = crossfit(probs, y, rule, inner)
    table = [{"model": name, "role": "student" if name == "student" else "teacher (submitted)" if name == teacher else
              "ensemble candidate", "rule": s["rule"], f"cross-fitted {metric}": s["score"],
              "same decisions as the teacher": float((decisions[name] == decisions[teacher]).all(1).mean())}
             for name, s in scores.items()]
    return scores, table


def report_markdown(report: dict) -> str:
    metric, s, t = report["metric"], report["scores"]["student"], report["scores"][report["teacher"]]
    return "\n".join([
        f"# Distilled student: {report['name']}\n",
        f"{report['rows']} labelled rows (and {report['pool_rows']} pool rows labelled by the run) teach the student "
        f"the submitted candidate's (**{report['teacher']}**) probabilities. Every score is out-of-fold {metric}: "
        "the student's from students that never learned those rows' targets (one per fold), each model's "
        "with its best rule cross-fitted over the ensemble's inner folds.\n",
        markdown(report["table"]),
        f"\n**Student: {s['score']:.4f}** (rule `{s['rule']}`), {s['score'] - t['score']:+.4f} against the teacher.\n",
        "## CPU forms\n",
        markdown([{"form": form, "file": f["file"], "MB": f["bytes"] / 2**20,
                   "largest probability difference from fp32": f"{f['max_abs_diff']:.2g}"} for form, f in report["exports"].items()]),
    ]) + "\n"
