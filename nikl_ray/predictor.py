"""A finished run as one object: `Predictor.load(results_dir)`, then `predict(rows)`.

It reads the run's record (`ensemble/run.json`, written by the ensemble stage: the task, the
backbones as trained, every candidate's rule) and nothing outside the results folder but the
base checkpoints that adapters sit on: a copied results folder answers without its experiment
file or training data. It answers for rows exactly as the submission did: each row is read by
the one fold model and the one inner fold of heads that a stable hash of its content picks (the
same as for test rows), then the same `stacking.candidate_probs` and the candidate's rule. The
submitted candidate answers unless another is asked for (`leaderboard()` lists them).
`nikl-ray predict`, `serve`, `explain`, `select` and the benchmarks go through here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from nikl_ray.artifacts import load_manifest, read_json
from nikl_ray.backbones import BackboneSpec, load_trained
from nikl_ray.data import TextRows, first_span
from nikl_ray.decision import decide, thresholds
from nikl_ray.layout import Layout
from nikl_ray.members import CLASSICAL, SentenceVectors, classical_probs, embed, load_classical
from nikl_ray.modes import mode_of
from nikl_ray.runspec import assign
from nikl_ray.stacking import STACKS, Heads, candidate_probs
from nikl_ray.tasks import TaskSpec

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the run cannot answer (an unknown candidate, a target not in its text)."""


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (n, L)
    decisions: np.ndarray  # (n, L) bool
    candidate: str
    rule: str


class FinishedRun:
    """What a finished run of either task kind is read as: its record's task, backbones, submitted
    candidate and its rule, folds, leaderboard; fold models loaded once each."""

    def __init__(self, layout: Layout, record: dict):
        self.layout, self.record = layout, record
        self.task = TaskSpec(**record["task"])
        self.backbones = {d["name"]: _spec(d, layout) for d in record["backbones"]}
        self.decision = record["decision"]
        self.candidate = self.decision["candidate"]
        self.rule = record["rules"][self.candidate]["rule"]
        self.k = self.decision["k"]
        self._models: dict[tuple[str, int], object] = {}

    def leaderboard(self) -> list[dict]:
        """Every candidate's out-of-fold scores and its role: the report's table."""
        board = self.record["leaderboard"]
        return [dict(zip(board["columns"], row)) for row in board["rows"]]

    @property
    def candidates(self) -> list[str]:
        return list(self.record["rules"])

    def warm_up(self) -> float:
        """Load every model the submitted candidate reads and run each once (what a served replica
        does before it reports ready: its first request then costs what the next ones do). Returns
        the seconds it took."""
        raise NotImplementedError


def covering_texts(key_of, choices: dict[str, int]) -> list[str]:
    """`warm up 0`, `warm up 1`, … : as few as route a row to every fold model and inner fold
    (`choices`: salt → how many, as runspec.assign routes a key)."""
    texts, seen = [], {salt: set() for salt in choices}
    for i in range(100_000):
        if all(len(seen[salt]) == n for salt, n in choices.items()):
            break
        text = f"warm up {i}"
        routes = {salt: int(assign([key_of(text)], n, salt)[0]) for salt, n in choices.items()}
        if any(c not in seen[salt] for salt, c in routes.items()):
            texts.append(text)
            for salt, c in routes.items():
                seen[salt].add(c)
    return texts


class Predictor(FinishedRun):
    def __init__(self, layout: Layout, record: dict):
        super().__init__(layout, record)
        self.params, self.inner_folds = self.decision["params"], self.decision["inner_folds"]
        self._heads: dict[str, Heads] = {}

    @classmethod
    def load(cls, results: str | Path, *, student: bool | str | None = None) -> "Predictor":
        """The finished run in the results folder `results` (or a Run's); a generate run's is a
        nikl_ray.qa.predictor.QAPredictor (`generate(questions)` in place of `predict(rows)`).
        `student`: answered by its distilled student alone instead (`nikl-ray distill`), in fp32
        (True) or one of its CPU forms (`"int8"`, `"onnx"`)."""
        layout = Layout(getattr(results, "results", results))
        if not layout.record.exists():
            raise FileNotFoundError(f"no finished run in {layout.root}: {layout.record} is missing "
                                    "(run the pipeline, or its ensemble stage, first)")
        record = read_json(layout.record)
        if record["task"].get("kind") == "generate":
            if student:
                raise ValueError("a generate run has no distilled student")
            from nikl_ray.qa.predictor import QAPredictor

            return QAPredictor(layout, record)
        if student:
            return StudentPredictor(layout, record, "fp32" if student is True else student)
        return cls(layout, record)

    def warm_up(self) -> float:
        t0 = time.time()
        target = "warm" if self.task.target_field else None
        texts = covering_texts(lambda t: self.rows_of([t], [target]).keys()[0], {"fold": self.k, "inner": self.inner_folds})
        self.predict(self.rows_of(texts, [target] * len(texts)))
        return time.time() - t0

    def repeated_words(self) -> set[str]:
        """The words the training text has more than once (select's rarity)."""
        return set(read_json(self.layout.repeated_words))

    def _fold_model(self, member: str, fold: int):
        key = (member, fold)
        if key not in self._models:
            if member in CLASSICAL:
                self._models[key] = load_classical(self.layout.features(member, fold))
            else:
                pair = self.layout.pair(member, fold)
                self._models[key] = load_trained(self.backbones[member], pair / load_manifest(pair)["best_checkpoint"],
                                                 len(self.task.labels), self.task.multi_label)
        return self._models[key]

    def _head(self, stack: str) -> Heads:
        if stack not in self._heads:
            self._heads[stack] = Heads.load(self.layout.heads, stack, self.decision["hidden_sizes"], self.inner_folds,
                                            len(self.task.labels), self.task.multi_label)
        return self._heads[stack]

    def _features(self, member: str, rows: TextRows, folds: np.ndarray | None,
                  vectors: SentenceVectors | None = None) -> tuple[np.ndarray | None, np.ndarray]:
        """A member's (hidden, probs) of rows: each from its fold model `folds[row]`, or (bagged,
        without `folds`) the average of every fold model's. `vectors`: these rows' sentence vectors,
        embedded once for all fold models (kept for this call only, so a server's memory stays flat)."""
        vectors = vectors or SentenceVectors()
        if folds is None:
            each = [self._features(member, rows, np.full(len(rows), fold), vectors) for fold in range(self.k)]
            return (None if each[0][0] is None else np.mean([h for h, _ in each], 0)), np.mean([p for _, p in each], 0)
        hidden, probs = None, np.zeros((len(rows), len(self.task.labels)), np.float32)
        for fold in np.unique(folds):
            idx = np.flatnonzero(folds == fold)
            model = self._fold_model(member, int(fold))
            if member in CLASSICAL:
                probs[idx] = classical_probs(model, rows.take(idx), self.task.multi_label, vectors)
                continue
            tokenizer, net = model
            h, p = embed(self.backbones[member], tokenizer, net, rows.take(idx), self.task.multi_label)
            hidden = np.zeros((len(rows), h.shape[1]), np.float32) if hidden is None else hidden
            hidden[idx], probs[idx] = h, p
        return hidden, probs

    def predict(self, rows: TextRows, candidate: str | None = None, *, keys: list[str] | None = None) -> Prediction:
        """Probabilities and labels of rows from `candidate` (default: the submitted one). `keys` routes
        rows as other rows would be (explain reads every masked variant of a sentence with the
        sentence's own fold model and heads)."""
        candidate = candidate or self.candidate
        if candidate not in self.record["rules"]:
            raise BadRequest(f"no candidate {candidate!r} in this run; candidates: {self.candidates}")
        keys = keys or rows.keys()
        folds, inner = ((assign(keys, self.k, "fold"), assign(keys, self.inner_folds, "inner"))
                        if self.decision.get("test_rows", "routed") == "routed" else (None, None))
        active = self.decision["active"]
        members = [candidate] if candidate in self.decision["members"] else active
        features = {m: self._features(m, rows, folds) for m in members}
        stack = candidate.partition("@h")[0]
        heads = {stack: self._head(stack)} if stack in STACKS else {}
        probs = candidate_probs(candidate, features, active, heads, inner, self.task.multi_label)
        rule = self.record["rules"][candidate]
        return Prediction(probs, decide(probs, rule["rule"], rule["params"]), candidate, rule["rule"])

    def answer(self, rows: TextRows, candidate: str | None = None) -> list[dict]:
        """Per row: its labels, every label's probability, the rule and the candidate (what `serve`
        and `predict --json` return)."""
        out = self.predict(rows, candidate=candidate)
        return [{"labels": self.chosen(out, i), "probabilities": dict(zip(self.task.labels, map(float, out.probs[i]))),
                 "rule": out.rule, "candidate": out.candidate} for i in range(len(rows))]

    def thresholds(self) -> np.ndarray:
        """Each label's decision threshold under the run's rule (argmax has none: nan)."""
        return thresholds(self.rule, self.params, len(self.task.labels))

    def chosen(self, out: Prediction, i: int) -> list[str]:
        """The labels `out` gives its row `i`."""
        return [lab for lab, d in zip(self.task.labels, out.decisions[i]) if d]

    @staticmethod
    def rows_of(texts: list[str], targets: list[str | None] | None = None, *, in_text: bool = True) -> TextRows:
        """Rows from raw sentences; a target's first occurrence in its text is its span. With
        `in_text=False` a target the text does not contain (a keyword) is read without a span."""
        targets = targets or [None] * len(texts)
        spans = []
        for text, target in zip(texts, targets):
            span = first_span(text, target) if target else None
            if target and span is None and in_text:
                raise BadRequest(f"the target {target!r} does not occur in the text")
            spans.append(span)
        return TextRows(list(texts), [t or None for t in targets], spans)

    def predict_text(self, text: str, target: str | None = None) -> tuple[dict[str, float], list[str]]:
        """({label: probability}, chosen labels) for one sentence."""
        answer = self.answer(self.rows_of([text], [target]))[0]
        return answer["probabilities"], answer["labels"]


class StudentPredictor(Predictor):
    """The finished run answered by its distilled student (nikl_ray/stages/distill.py): one model,
    in fp32 (torch) or as an onnxruntime session of its int8 or ONNX export, with the rule its
    cross-fitted scores chose. Rows, answers and errors as the ensemble's, under the candidate
    `student`; an answer also says which form gave it."""

    CANDIDATE = "student"

    def __init__(self, layout: Layout, record: dict, form: str):
        from nikl_ray.export import FORMS

        if form not in FORMS:
            raise ValueError(f"student form {form!r}: one of {list(FORMS)}")
        if not layout.student_record.exists():
            raise FileNotFoundError(f"no distilled student in {layout.root}: {layout.student_record} is missing "
                                    "(run `nikl-ray distill` first)")
        super().__init__(layout, record)
        self.student, self.form = read_json(layout.student_record), form
        self.candidate, self.rule, self.params = self.CANDIDATE, self.student["rule"], self.student["params"]
        self.spec = _spec(self.student["backbone"], layout)
        self._loaded = None

    @property
    def candidates(self) -> list[str]:
        return [self.CANDIDATE]

    def _model(self):
        """(tokenizer, torch model or onnxruntime session), loaded once."""
        if self._loaded is None:
            checkpoint = self.layout.root / self.student["checkpoint"]
            if self.form == "fp32":
                self._loaded = load_trained(self.spec, checkpoint, len(self.task.labels), self.task.multi_label)
            else:
                from nikl_ray.backbones import trained_tokenizer
                from nikl_ray.export import load_session

                made = self.student["exports"][self.form]
                self._loaded = (trained_tokenizer(self.spec, checkpoint),
                                load_session(self.layout.distill / made["file"], made["sha256"]))
        return self._loaded

    def predict(self, rows: TextRows, candidate: str | None = None, *, keys: list[str] | None = None) -> Prediction:
        """As Predictor.predict; every row is read by the one student (`keys` route nothing)."""
        if candidate not in (None, self.CANDIDATE):
            raise BadRequest(f"this run is served by its student: no candidate {candidate!r} (candidates: {self.candidates})")
        tokenizer, model = self._model()
        if self.form == "fp32":
            probs = embed(self.spec, tokenizer, model, rows, self.task.multi_label)[1]
        else:
            from nikl_ray.export import onnx_probs

            probs = onnx_probs(model, tokenizer, self.spec, rows, self.task.multi_label)
        return Prediction(probs, decide(probs, self.rule, self.params), self.CANDIDATE, self.rule)

    def answer(self, rows: TextRows, candidate: str | None = None) -> list[dict]:
        return [{**a, "student": self.form} for a in super().answer(rows, candidate)]

    def warm_up(self) -> float:
        t0 = time.time()
        target = "warm" if self.task.target_field else None
        self.predict(self.rows_of(["warm up", "warm up a longer row of text"], [target, target]))
        return time.time() - t0


def _spec(d: dict, layout: Layout) -> BackboneSpec:
    """A backbone as the record keeps it; a checkpoint inside the results root is found in this copy of it."""
    d = dict(d)
    if d.pop("checkpoint_in_results", False):
        d["checkpoint"] = str(layout.root / d["checkpoint"])
    try:
        return BackboneSpec(**d)
    except ValidationError as e:
        if not mode_of(d.get("mode", "full")).adapter:  # a fully fine-tuned fold checkpoint holds every weight and its tokenizer
            return BackboneSpec.model_construct(**d)
        raise FileNotFoundError(f"backbone {d['name']}: its fold models are adapters on {d['checkpoint']}, which "
                                f"cannot be loaded: {e.errors()[0]['msg']}") from None
