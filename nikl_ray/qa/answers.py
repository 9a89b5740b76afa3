"""The features stage of a generate task: every member's answers to the questions it never saw.

For each (member, fold): the answers to the fold's held-out questions (every phrasing of every
held-out item, `<id>#q<j>`) and to the test rows routed to that fold (runspec.answering_positions,
as for classification), saved as JSON: per question its greedy answer first, then any sampled
answers, each with its mean token log-probability. A fold's final Train run writes them while
its model is loaded (handoff: taken when they are of its best checkpoint); otherwise one named
Ray task per (member, fold) loads the best checkpoint and answers.

The retrieval member (`classical: true`): per question, the first reference answer of the
fold's training item (training part and selection slice) whose question is nearest by TF-IDF
over characters 1–3 — the competition's retrieval baseline, cross-fitted like every member —
and, as its further candidates for the ensemble's MBR, every reference of the
`retrieval_items` nearest items.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nikl_ray import handoff
from nikl_ray.artifacts import MANIFEST, load_manifest, manifest_problem, read_json, sha256_file, write_json, write_manifest
from nikl_ray.folds import fold_positions
from nikl_ray.members import RETRIEVAL, member_names
from nikl_ray.runspec import FoldRun, answering_positions, final_run, held_out_hash

log = logging.getLogger(__name__)
PARTS = ("oof", "test")


# ---------------------------------------------------------------------------- files
def save_answers(d: Path, parts: dict) -> list[Path]:
    """`parts`: {part: (question ids, per question [(text, log-probability or None), …])}."""
    return [write_json(Path(d) / f"{part}_answers.json", {"ids": list(ids), "answers": [[list(a) for a in q] for q in answers]})
            for part, (ids, answers) in parts.items()]


def read_answers(d: Path) -> dict:
    """{part: {"ids": [...], "answers": [[[text, logp], …], …]}} (raises OSError/ValueError when cut short)."""
    return {part: read_json(Path(d) / f"{part}_answers.json") for part in PARTS}


def write_handoff(order, parts: dict, step: int) -> None:
    """A final run's answers from the model in hand, stamped with its weights' step (written last)."""
    d = Path(order.dir)
    (d / handoff.MADE).unlink(missing_ok=True)
    save_answers(d, parts)
    write_json(d / handoff.MADE, {"step": step, "test_hash": order.test_hash})


# ---------------------------------------------------------------------------- Ray tasks
@dataclass(frozen=True)
class AnswerJob:
    member: str
    fold: int
    data: object  # QAPayload
    heldout_idx: np.ndarray
    test_idx: np.ndarray
    train_idx: np.ndarray  # what the fold model trained on (its prompts retrieve from these)
    retrieval_items: int = 1
    run: FoldRun | None = None
    checkpoint: str | None = None


def _resolved(data):
    """A job's rows: Ray resolves an ObjectRef passed as an argument, not one inside a dataclass."""
    import ray

    return ray.get(data) if isinstance(data, ray.ObjectRef) else data


def model_answers(job: AnswerJob) -> dict:
    """Ray task: a trained fold model answers its held-out and routed test questions."""
    from nikl_ray.backbones import load_trained_generator
    from nikl_ray.placement import cap_memory
    from nikl_ray.qa.data import queries, test_queries
    from nikl_ray.qa.worker import answer_queries, fold_prompter

    run, data = job.run, _resolved(job.data)
    cap_memory(run.memory_fraction, run.device)
    tokenizer, model = load_trained_generator(run.backbone, job.checkpoint, precision=run.precision)
    if run.device == "cuda":
        model.to("cuda")
    prompter = fold_prompter(run.backbone, tokenizer, data, job.train_idx)
    t0 = time.time()
    out = {}
    for part, qs in (("oof", queries(data.ids, data.questions, data.contexts, job.heldout_idx)),
                     ("test", test_queries(data.test_ids, data.test_questions, data.test_contexts, job.test_idx))):
        out[part] = ([q.id for q in qs], answer_queries(run.backbone, tokenizer, model, prompter, qs, 2 * run.backbone.batch_size))
    out["seconds"] = time.time() - t0
    return out


def retrieval_answers(job: AnswerJob) -> dict:
    """Ray task: the retrieval member on one fold (its index: the fold's training items)."""
    from nikl_ray.qa.data import queries, test_queries
    from nikl_ray.qa.sft import Retriever

    data = _resolved(job.data)
    index = Retriever(data.questions, job.train_idx)
    out = {}
    for part, qs in (("oof", queries(data.ids, data.questions, data.contexts, job.heldout_idx)),
                     ("test", test_queries(data.test_ids, data.test_questions, data.test_contexts, job.test_idx))):
        near = index.nearest([q.question for q in qs], job.retrieval_items) if qs else []
        out[part] = ([q.id for q in qs], [[(a, None) for i in n for a in data.answers[i]] for n in near])
    return out


def run(exp, data) -> Path:
    """Write every (member, fold)'s answers not already written. Returns the features root."""
    import ray

    from nikl_ray.cluster import plan_stage
    from nikl_ray.qa.data import queries, test_queries
    from nikl_ray.qa.sft import QAPayload

    layout, folds, rows, test = exp.layout, data.folds(exp), data.rows, data.test
    k = folds["k"]
    stage = plan_stage(exp, exp.backbones)
    answering = answering_positions(test, k)
    test_hash = test.data_hash() if test is not None else None
    plain = QAPayload.of(rows, test)
    payload = ray.put(plain)
    pending = {}
    for member in member_names(exp):
        for fold in range(k):
            train_idx, select_idx, held_idx = positions = fold_positions(rows, folds, fold)
            if member == RETRIEVAL:
                inputs = {"member": member, "data_hash": folds["data_hash"], "fold": fold, "k": k,
                          "held_out_hash": held_out_hash(folds, fold), "test_hash": test_hash,
                          "task": exp.task.model_dump(mode="json")}
                inputs["retrieval_items"] = exp.retrieval_items
                job = AnswerJob(member, fold, payload, held_idx, answering[fold], np.concatenate([train_idx, select_idx]),
                                exp.retrieval_items)
                fn, opts = retrieval_answers, {"num_cpus": 1}
            else:
                spec, pair = exp.backbone(member), layout.pair(member, fold)
                run_ = final_run(exp, spec, fold, positions, None, stage.placements[member], stage.device,
                                 handoff.order(layout, member, fold, answering[fold], test_hash))
                inputs = {"member": member, "train_manifest": sha256_file(pair / MANIFEST), "k": k, "test_hash": test_hash}
                job = AnswerJob(member, fold, payload, held_idx, answering[fold], train_idx, run=run_,
                                checkpoint=str(pair / load_manifest(pair)["best_checkpoint"]))
                fn, opts = model_answers, {"num_cpus": run_.placement.cpus, "num_gpus": run_.placement.gpu_share}
            d = layout.features(member, fold)
            why = manifest_problem(d, inputs, __name__)
            if why is None:
                continue
            if job.run is not None:
                oof_ids = [q.id for q in queries(plain.ids, plain.questions, plain.contexts, held_idx)]
                test_ids = [q.id for q in test_queries(plain.test_ids, plain.test_questions, plain.test_contexts, answering[fold])]
                made = handoff.take(Path(job.run.features.dir), Path(job.checkpoint), oof_ids, test_ids, test_hash,
                                    read=read_answers)
                if made is not None:
                    _save(d, {p: (made[p]["ids"], made[p]["answers"]) for p in PARTS}, inputs)
                    log.info("features %s-fold%d: %s → answers taken from its train run", member, fold, why)
                    continue
            log.info("features %s-fold%d: %s → answering", member, fold, why)
            pending[ray.remote(**opts)(fn).options(name=f"answers {member}-fold{fold}").remote(job)] = (d, inputs, member, fold)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        d, inputs, member, fold = pending.pop(done[0])
        out = ray.get(done[0])
        seconds = out.pop("seconds", 0.0)
        _save(d, out, inputs)
        log.info("features %s-fold%d: %d held-out and %d test answers (%.1f s)", member, fold, len(out["oof"][0]),
                 len(out["test"][0]), seconds)
    return layout.features_root


def _save(d: Path, parts: dict, inputs: dict) -> None:
    write_manifest(d, inputs=inputs, files=save_answers(d, parts), code=__name__)
