"""A finished run as one object: `Predictor.load(exp)`, then `predict(rows)`.

It loads what the submitted candidate needs — fold models of its members (the classical one
included), the heads of its stack, its decision rule — and answers for rows exactly as the
submission did: each row is read by the one fold model and the one inner fold of heads that a
stable hash of its content picks (the same as for test rows), then the same
`stacking.candidate_probs` and the same rule. `nikl-ray predict`, the benchmark and anything
that serves the run go through here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from nikl_ray.artifacts import load_manifest, read_json
from nikl_ray.backbones import load_trained
from nikl_ray.config import Experiment
from nikl_ray.data import TextRows
from nikl_ray.decision import decide, thresholds
from nikl_ray.members import CLASSICAL, classical_probs, embed, load_classical
from nikl_ray.runspec import assign
from nikl_ray.stacking import STACKS, Heads, candidate_probs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (n, L)
    decisions: np.ndarray  # (n, L) bool
    candidate: str
    rule: str


class Predictor:
    def __init__(self, exp: Experiment, decision: dict):
        self.exp, self.decision = exp, decision
        self.task = exp.task
        self.candidate, self.rule, self.params = decision["candidate"], decision["rule"], decision["params"]
        self.k, self.inner_folds = decision["k"], decision["inner_folds"]
        stack = self.candidate.partition("@h")[0]
        self.members = [self.candidate] if self.candidate in decision["members"] else decision["active"]
        self.heads = {stack: Heads.load(exp.layout.heads, stack, decision["hidden_sizes"], self.inner_folds,
                                        len(self.task.labels), self.task.multi_label)} if stack in STACKS else {}
        self._models: dict[tuple[str, int], object] = {}

    @classmethod
    def load(cls, exp: Experiment) -> "Predictor":
        path = exp.layout.decision
        if not path.exists():
            raise FileNotFoundError(f"no finished run in {exp.results}: {path} is missing (run the pipeline first)")
        return cls(exp, read_json(path))

    def _fold_model(self, member: str, fold: int):
        key = (member, fold)
        if key not in self._models:
            if member == CLASSICAL:
                self._models[key] = load_classical(self.exp.layout.features(member, fold))
            else:
                pair = self.exp.layout.pair(member, fold)
                self._models[key] = load_trained(self.exp.backbone(member), pair / load_manifest(pair)["best_checkpoint"],
                                                 len(self.task.labels), self.task.multi_label)
        return self._models[key]

    def _features(self, member: str, rows: TextRows, folds: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        hidden, probs = None, np.zeros((len(rows), len(self.task.labels)), np.float32)
        for fold in np.unique(folds):
            idx = np.flatnonzero(folds == fold)
            model = self._fold_model(member, int(fold))
            if member == CLASSICAL:
                probs[idx] = classical_probs(model, rows.take(idx), self.task.multi_label)
                continue
            tokenizer, net = model
            h, p = embed(self.exp.backbone(member), tokenizer, net, rows.take(idx), self.task.multi_label)
            hidden = np.zeros((len(rows), h.shape[1]), np.float32) if hidden is None else hidden
            hidden[idx], probs[idx] = h, p
        return hidden, probs

    def predict(self, rows: TextRows, keys: list[str] | None = None) -> Prediction:
        """Probabilities and labels of rows. `keys` routes rows as other rows would be (explain reads
        every masked variant of a sentence with the sentence's own fold model and heads)."""
        keys = keys or rows.keys()
        folds, inner = assign(keys, self.k, "fold"), assign(keys, self.inner_folds, "inner")
        features = {m: self._features(m, rows, folds) for m in self.members}
        active = [m for m in self.decision["active"] if m in features]
        probs = candidate_probs(self.candidate, features, active, self.heads, inner, self.task.multi_label)
        return Prediction(probs, decide(probs, self.rule, self.params), self.candidate, self.rule)

    def thresholds(self) -> np.ndarray:
        """Each label's decision threshold under the run's rule (argmax has none: nan)."""
        return thresholds(self.rule, self.params, len(self.task.labels))

    def chosen(self, out: Prediction, i: int) -> list[str]:
        """The labels `out` gives its row `i`."""
        return [lab for lab, d in zip(self.task.labels, out.decisions[i]) if d]

    @staticmethod
    def rows_of(texts: list[str], targets: list[str | None] | None = None) -> TextRows:
        """Rows from raw sentences; a target's first occurrence in its text is its span."""
        targets = targets or [None] * len(texts)
        spans = []
        for text, target in zip(texts, targets):
            begin = text.find(target) if target else -1
            if target and begin < 0:
                raise ValueError(f"the target {target!r} does not occur in the text")
            spans.append((begin, begin + len(target)) if target else None)
        return TextRows(list(texts), [t or None for t in targets], spans)

    def predict_text(self, text: str, target: str | None = None) -> tuple[dict[str, float], list[str]]:
        """({label: probability}, chosen labels) for one sentence."""
        out = self.predict(self.rows_of([text], [target]))
        return (dict(zip(self.task.labels, map(float, out.probs[0]))),
                self.chosen(out, 0))
