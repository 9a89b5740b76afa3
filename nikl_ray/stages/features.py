"""The features stage: what every fold model says about the rows it never saw.

For each (member, fold): the out-of-fold rows (the fold's held-out rows) and the test rows
*assigned* to that fold, as row ids + probabilities (+ pooled hidden states for neural members).
A test row is assigned to one fold model by a stable hash of its content (runspec.assign), so
it is predicted exactly as an out-of-fold row is: by one fold model that never saw it. Saved as
`.npy` (read with allow_pickle=False) + ids in JSON, so members are always joined by id.
A final Train run writes its fold model's features itself while the model is loaded (see
runspec.FeatureOrder): they are taken when they are of the run's best checkpoint and of these
rows. Otherwise one named Ray task per (member, fold) computes them, with the fold model's card
share from the plan.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nikl_ray.artifacts import load_manifest, manifest_problem, read_json, sha256_file, write_manifest
from nikl_ray.backbones import BackboneSpec
from nikl_ray.config import Experiment
from nikl_ray.data import TextRows
from nikl_ray.folds import fold_positions
from nikl_ray.inputs import Inputs
from nikl_ray.members import (CLASSICAL, classical_probs, fit_classical, member_names, read_features, save_classical,
                              save_features)
from nikl_ray.runspec import MADE, answering_positions, held_out_hash

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
    spec: BackboneSpec | None = None  # neural members
    checkpoint: str | None = None
    precision: str = "fp32"
    device: str = "cpu"
    memory_fraction: float | None = None
    train: TextRows | None = None  # the classical member fits here
    train_labels: np.ndarray | None = None
    progress: bool = False  # progress bars (in the driver's console): only when it is a terminal


def neural_features(job: FeatureJob) -> dict:
    """Ray task: embed the held-out fold and the assigned test rows with one trained fold model."""
    import torch

    from nikl_ray.backbones import load_trained
    from nikl_ray.members import embed

    if job.device == "cuda" and job.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(job.memory_fraction)
    tokenizer, model = load_trained(job.spec, job.checkpoint, job.num_labels, job.multi_label, precision=job.precision)
    if job.device == "cuda":
        model.to("cuda")
    out = {}
    for part, ids, rows in (("oof", job.oof_ids, job.oof), ("test", job.test_ids, job.test)):
        t0 = time.time()
        hidden, probs = embed(job.spec, tokenizer, model, rows, job.multi_label,
                              progress=f"features {job.member}-fold{job.fold} {part}" if job.progress else None)
        out[part] = {"ids": ids, "hidden": hidden, "probs": probs, "seconds": time.time() - t0}
    return out


def classical_features(job: FeatureJob) -> dict:
    """Ray task: fit the TF-IDF + logistic-regression member on one fold's training rows, predict."""
    t0 = time.time()
    model = fit_classical(job.train, job.train_labels, job.multi_label)
    out = {"model": model}
    for part, ids, rows in (("oof", job.oof_ids, job.oof), ("test", job.test_ids, job.test)):
        out[part] = {"ids": ids, "hidden": None, "probs": classical_probs(model, rows, job.multi_label)}
    out["oof"]["seconds"] = time.time() - t0
    return out


def made_by_its_run(made: Path, best: Path, oof_ids: list[str], test_ids: list[str], test_hash: str | None) -> dict | None:
    """The features a fold's final Train run wrote (runspec.FeatureOrder), when they come from the
    weights of its best checkpoint `best` and are of these rows; None otherwise (a run resumed after a
    kill or retried out of memory writes none: which weights it ends with is not certain)."""
    try:
        stamp = read_json(made / MADE)
        out = read_features(made)
        best_step = read_json(best / "trainer_state.json")["global_step"]
    except (OSError, ValueError, KeyError):
        return None
    if (stamp["step"], stamp["test_hash"], out["oof"]["ids"], out["test"]["ids"]) != (best_step, test_hash, oof_ids, test_ids):
        return None
    return out


def _save(d: Path, out: dict, inputs: dict) -> None:
    files = save_classical(d, out.pop("model")) if "model" in out else []
    files += save_features(d, out)
    write_manifest(d, inputs=inputs, files=files, code=__name__)


def run(exp: Experiment, data: Inputs) -> Path:
    """Write the features of every (member, fold) not already done. Returns the features root."""
    import ray

    from nikl_ray.cluster import plan_stage

    layout, folds, rows, test = exp.layout, data.folds(exp), data.rows, data.test
    k = folds["k"]
    stage = plan_stage(exp, exp.backbones)
    answering = answering_positions(test, k)
    test_hash = test.data_hash() if test is not None else None
    pending = {}
    for member in member_names(exp):
        for fold in range(k):
            train_idx, select_idx, held_idx = fold_positions(rows, folds, fold)
            picked = answering[fold]
            common = dict(member=member, fold=fold, multi_label=exp.task.multi_label, num_labels=len(exp.task.labels),
                          oof_ids=[rows.ids[i] for i in held_idx], oof=rows.inputs().take(held_idx),
                          test_ids=[test.ids[i] for i in picked] if test is not None else [],
                          test=test.inputs().take(picked) if test is not None else TextRows([], [], []))
            if member == CLASSICAL:
                fit_idx = np.concatenate([train_idx, select_idx])  # no epochs to choose: it fits on the whole training part
                inputs = {"member": member, "data_hash": folds["data_hash"], "fold": fold, "k": k,
                          "held_out_hash": held_out_hash(folds, fold), "test_hash": test_hash,
                          "task": exp.task.model_dump(mode="json")}
                job = FeatureJob(**common, train=rows.inputs().take(fit_idx), train_labels=rows.labels[fit_idx])
                fn, opts = classical_features, {"num_cpus": 1}
            else:
                spec, pair = exp.backbone(member), layout.pair(member, fold)
                p = stage.placements[member]
                # the train manifest vouches for the weights' checksums: new weights, new features
                inputs = {"member": member, "train_manifest": sha256_file(pair / "manifest.json"), "k": k,
                          "test_hash": test_hash}
                job = FeatureJob(**common, spec=spec, checkpoint=str(pair / load_manifest(pair)["best_checkpoint"]),
                                 progress=sys.stderr.isatty(),
                                 precision=stage.device.precision(spec), device=stage.device.device,
                                 memory_fraction=p.memory_fraction if stage.device.device == "cuda" else None)
                fn, opts = neural_features, {"num_cpus": p.cpus, "num_gpus": p.gpu_share}
            d = layout.features(member, fold)
            why = manifest_problem(d, inputs, __name__)
            if why is None:
                continue
            made = None if member == CLASSICAL else made_by_its_run(layout.run_features(member, fold), Path(job.checkpoint),
                                                                     job.oof_ids, job.test_ids, test_hash)
            if made is not None:
                _save(d, made, inputs)
                log.info("features %s-fold%d: %s → taken from its train run", member, fold, why)
                continue
            log.info("features %s-fold%d: %s → computing", member, fold, why)
            pending[ray.remote(**opts)(fn).options(name=f"features {member}-fold{fold}").remote(job)] = (d, inputs, member, fold)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        d, inputs, member, fold = pending.pop(done[0])
        out = ray.get(done[0])
        _save(d, out, inputs)
        log.info("features %s-fold%d: %d out-of-fold and %d test rows (%.1f s)", member, fold, len(out["oof"]["ids"]),
                 len(out["test"]["ids"]), out["oof"].get("seconds", 0) + out["test"].get("seconds", 0))
    return layout.features_root
