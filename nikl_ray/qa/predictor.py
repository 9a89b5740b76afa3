"""A finished generate run as one object (what `Predictor.load` returns for a QA run).

It reads the run's record (`ensemble/run.json`), the training items retrieval needs
(`ensemble/qa_items.json`) and the folds (`split/folds.json`), all in the results folder, and
the base checkpoints adapters sit on. A question is answered as a test question was: routed by
a stable hash of its text to one fold model per member (runspec.row_keys), whose prompt
retrieves only from that fold's training items; the retrieval member searches that fold's
training part; then the candidate's rule: one member's greedy answer, or MBR over its members'
candidates.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np

from nikl_ray.artifacts import load_manifest, read_json
from nikl_ray.folds import fold_positions
from nikl_ray.layout import Layout
from nikl_ray.predictor import BadRequest, FinishedRun, covering_texts
from nikl_ray.members import RETRIEVAL
from nikl_ray.qa.data import Query
from nikl_ray.runspec import assign, question_key

log = logging.getLogger(__name__)


class QAPredictor(FinishedRun):
    def __init__(self, layout: Layout, record: dict):
        super().__init__(layout, record)
        items = read_json(layout.qa_items)
        self.items = SimpleNamespace(ids=items["ids"], questions=items["questions"], contexts=items["contexts"],
                                     answers=items["answers"])
        self.folds = read_json(layout.folds)
        self._judge = None

    def warm_up(self) -> float:
        t0 = time.time()
        self.generate(covering_texts(lambda q: question_key(q, None), {"fold": self.k}))
        return time.time() - t0

    def _fold(self, member: str, fold: int):
        """(tokenizer, model, prompter) of a fold model, or the retrieval member's index on that fold."""
        key = (member, fold)
        if key not in self._models:
            from nikl_ray.qa.sft import Retriever

            train, select, _ = fold_positions(self.items, self.folds, fold)
            if member == RETRIEVAL:
                self._models[key] = Retriever(self.items.questions, np.concatenate([train, select]))
            else:
                from nikl_ray.backbones import load_trained_generator
                from nikl_ray.qa.worker import fold_prompter

                spec, pair = self.backbones[member], self.layout.pair(member, fold)
                tokenizer, model = load_trained_generator(spec, pair / load_manifest(pair)["best_checkpoint"])
                self._models[key] = (tokenizer, model, fold_prompter(spec, tokenizer, self.items, train))
        return self._models[key]

    def _answers(self, member: str, qs: list[Query], folds: np.ndarray) -> list[list[tuple[str, float | None]]]:
        from nikl_ray.qa.worker import answer_queries

        out: list = [None] * len(qs)
        for fold in np.unique(folds):
            idx = np.flatnonzero(folds == fold)
            model = self._fold(member, int(fold))
            part = [qs[i] for i in idx]
            if member == RETRIEVAL:
                near = model.nearest([q.question for q in part], self.decision.get("retrieval_items", 1))
                got = [[(a, None) for i in n for a in self.items.answers[i]] for n in near]
            else:
                tokenizer, net, prompter = model
                got = answer_queries(self.backbones[member], tokenizer, net, prompter, part, 16)
            for j, i in enumerate(idx):
                out[i] = got[j]
        return out

    def generate(self, questions: list[str], contexts: list[str | None] | None = None,
                 candidate: str | None = None) -> list[dict]:
        """Per question: the answer of `candidate` (default: the submitted one), the member it came
        from, and every member's candidates."""
        from nikl_ray.qa.ensemble import Judge, mbr_answers

        candidate = candidate or self.candidate
        if candidate not in self.record["rules"]:
            raise BadRequest(f"no candidate {candidate!r} in this run; candidates: {self.candidates}")
        contexts = contexts or [None] * len(questions)
        if self.task.context_field is None and any(contexts):
            raise BadRequest(f"task {self.task.name} has no context")
        rule = self.record["rules"][candidate]
        questions, contexts = [q.strip() for q in questions], [c or None for c in contexts]
        folds = assign([question_key(q, c) for q, c in zip(questions, contexts)], self.k, "fold")
        qs = [Query(f"request#{i}", -1, q, c) for i, (q, c) in enumerate(zip(questions, contexts))]
        got = {m: self._answers(m, qs, folds) for m in rule["members"]}
        pools = [[(m, a[0]) for m in rule["members"] for a in got[m][i]] for i in range(len(qs))]
        if rule["rule"] == "mbr":
            self._judge = self._judge or Judge(self.task)
            picked = mbr_answers(self._judge, pools)
        else:
            picked = [p[0] for p in pools]
        return [{"answer": answer, "member": member, "candidate": candidate, "rule": rule["rule"],
                 "candidates": [{"member": m, "answer": a} for m, a in pool]} for (member, answer), pool in zip(picked, pools)]
