"""The features stage: what every fold model says about the rows it never saw.

For each (member, fold): the out-of-fold rows (the fold's held-out rows) and every test row, as
row ids + probabilities (+ pooled hidden states for neural members). The ensemble answers a test
row with the one fold model a stable hash of its content picks (runspec.assign), exactly as an
out-of-fold row is answered, or with all of them averaged (`ensemble.test_rows`). Saved as
`.npy` (read with allow_pickle=False) + ids in JSON, so members are always joined by id.
A final Train run writes its fold model's features itself while the model is loaded
(nikl_ray/handoff.py): they are taken when they are of the run's best checkpoint and of these
rows. Otherwise one named Ray task per (member, fold) computes them, from the same FoldRun the
train stage fitted (runspec.final_run: its held-out rows, test rows, device, precision and card
share from the plan).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nikl_ray import handoff
from nikl_ray.artifacts import MANIFEST, load_manifest, manifest_problem, sha256_file, write_manifest
from nikl_ray.config import Experiment
from nikl_ray.data import TextRows
from nikl_ray.folds import fold_positions
from nikl_ray.inputs import Inputs
from nikl_ray.members import (CLASSICAL, SentenceVectors, classical_probs, fit_classical, member_names, save_classical,
                              save_features)
from nikl_ray.runspec import FoldRun, answering_positions, final_run, held_out_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureJob:
    member: str
    fold: int
    multi_label: bool
    num_labels: int
    oof_ids: list[str]
    oof: TextRows
    test_ids: list[str]
    test: TextRows
    run: FoldRun | None = None  # neural members: the pair's final run, whose best checkpoint reads the rows
    checkpoint: str | None = None
    train: TextRows | None = None  # the classical member fits here
    train_labels: np.ndarray | None = None
    progress: bool = False  # progress bars (in the driver's console): only when it is a terminal


def neural_features(job: FeatureJob) -> dict:
    """Ray task: embed the held-out fold and the test rows with one trained fold model."""
    from nikl_ray.backbones import load_trained
    from nikl_ray.members import embed
    from nikl_ray.placement import cap_memory

    run = job.run
    cap_memory(run.memory_fraction, run.device)
    tokenizer, model = load_trained(run.backbone, job.checkpoint, job.num_labels, job.multi_label, precision=run.precision)
    if run.device == "cuda":
        model.to("cuda")
    out = {}
    for part, ids, rows in (("oof", job.oof_ids, job.oof), ("test", job.test_ids, job.test)):
        t0 = time.time()
        hidden, probs = embed(run.backbone, tokenizer, model, rows, job.multi_label,
                              progress=f"features {job.member}-fold{job.fold} {part}" if job.progress else None)
        out[part] = {"ids": ids, "hidden": hidden, "probs": probs, "seconds": time.time() - t0}
    return out


def classical_features(job: FeatureJob, vectors: SentenceVectors | None = None) -> dict:
    """Ray task: fit a classical member on one fold's training rows, predict."""
    t0 = time.time()
    model = fit_classical(job.train, job.train_labels, job.multi_label, job.member, vectors)
    out = {"model": model}
    for part, ids, rows in (("oof", job.oof_ids, job.oof), ("test", job.test_ids, job.test)):
        out[part] = {"ids": ids, "hidden": None, "probs": classical_probs(model, rows, job.multi_label, vectors)}
    out["oof"]["seconds"] = time.time() - t0
    return out




def sentence_vectors(parts: list[TextRows]) -> SentenceVectors:
    """Ray task: every row's sentence vectors, once for all folds of the members that read them."""
    vectors = SentenceVectors()
    for rows in parts:
        vectors(rows)
    return vectors


def rows_of(exp: Experiment, rows, test, held_idx: np.ndarray, test_idx: np.ndarray, member: str, fold: int) -> dict:
    """A job's rows: the fold's held-out rows and the test rows its fold model answers (runspec.answering_positions)."""
    return dict(member=member, fold=fold, multi_label=exp.task.multi_label, num_labels=len(exp.task.labels),
                oof_ids=[rows.ids[i] for i in held_idx], oof=rows.inputs().take(held_idx),
                test_ids=[test.ids[i] for i in test_idx] if test is not None else [],
                test=test.inputs().take(test_idx) if test is not None else TextRows([], [], []))


def _save(d: Path, out: dict, inputs: dict) -> None:
    files = save_classical(d, out.pop("model")) if "model" in out else []
    files += save_features(d, out)
    write_manifest(d, inputs=inputs, files=files, code=__name__)


def run(exp: Experiment, data: Inputs) -> Path:
    """Write the features of every (member, fold) not already done. Returns the features root."""
    import ray

    if exp.task.generates:
        from nikl_ray.qa import answers

        return answers.run(exp, data)
    from nikl_ray.cluster import plan_stage

    layout, folds, rows, test = exp.layout, data.folds(exp), data.rows, data.test
    k = folds["k"]
    stage = plan_stage(exp, exp.backbones)
    answering = answering_positions(test, k)
    test_hash = test.data_hash() if test is not None else None
    pending, vectors = {}, None
    for member in member_names(exp):
        for fold in range(k):
            positions = fold_positions(rows, folds, fold)
            if member in CLASSICAL:
                train_idx, select_idx, held_idx = positions
                inputs = {"member": member, "data_hash": folds["data_hash"], "fold": fold, "k": k,
                          "held_out_hash": held_out_hash(folds, fold), "test_hash": test_hash,
                          "task": exp.task.model_dump(mode="json")}
                fit_idx = np.concatenate([train_idx, select_idx])  # no epochs to choose: it fits on the whole training part
                job = FeatureJob(**rows_of(exp, rows, test, held_idx, answering[fold], member, fold),
                                 train=rows.inputs().take(fit_idx), train_labels=rows.labels[fit_idx])
                fn, opts, args = classical_features, {"num_cpus": 1}, ()
                if CLASSICAL[member][1] == "sentence-vectors":
                    if vectors is None:
                        parts = [rows.inputs()] + ([test.inputs()] if test is not None else [])
                        # one core, as each classical fold job: the other folds' jobs keep the rest busy,
                        # and a cluster of one-core nodes can place it
                        vectors = ray.remote(num_cpus=1)(sentence_vectors).options(
                            name="features sentence vectors").remote(parts)
                        log.info("features: embedding %d rows' texts and targets once, for every fold of %s",
                                 sum(map(len, parts)), member)
                    args = (vectors,)
            else:
                spec, pair = exp.backbone(member), layout.pair(member, fold)
                run_ = final_run(exp, spec, fold, positions, None, stage.placements[member], stage.device,
                                 handoff.order(layout, member, fold, answering[fold], test_hash))
                # the train manifest vouches for the weights' checksums: new weights, new features
                inputs = {"member": member, "train_manifest": sha256_file(pair / MANIFEST), "k": k, "test_hash": test_hash}
                job = FeatureJob(**rows_of(exp, rows, test, run_.heldout_idx, run_.features.test_idx, member, fold), run=run_,
                                 checkpoint=str(pair / load_manifest(pair)["best_checkpoint"]), progress=sys.stderr.isatty())
                fn, opts, args = neural_features, {"num_cpus": run_.placement.cpus, "num_gpus": run_.placement.gpu_share}, ()
            d = layout.features(member, fold)
            why = manifest_problem(d, inputs, __name__)
            if why is None:
                continue
            made = None if member in CLASSICAL else handoff.take(Path(job.run.features.dir), Path(job.checkpoint),
                                                                  job.oof_ids, job.test_ids, test_hash)
            if made is not None:
                _save(d, made, inputs)
                log.info("features %s-fold%d: %s → taken from its train run", member, fold, why)
                continue
            log.info("features %s-fold%d: %s → computing", member, fold, why)
            pending[ray.remote(**opts)(fn).options(name=f"features {member}-fold{fold}").remote(job, *args)] = (d, inputs, member, fold)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        d, inputs, member, fold = pending.pop(done[0])
        out = ray.get(done[0])
        _save(d, out, inputs)
        log.info("features %s-fold%d: %d out-of-fold and %d test rows (%.1f s)", member, fold, len(out["oof"]["ids"]),
                 len(out["test"]["ids"]), out["oof"].get("seconds", 0) + out["test"].get("seconds", 0))
    return layout.features_root
