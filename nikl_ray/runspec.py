"""A FoldRun: one (backbone, fold) resolved once — device, precision, gradient checkpointing,
memory cap, Ray resources, which rows train, choose the epoch and are held out — and typed,
because it crosses into Ray Train workers, Tune trials and features tasks.

Train, tune and features build their runs here (`fold_run`, `final_run`), so the same backbone
always runs the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nikl_ray.backbones import BackboneSpec
from nikl_ray.data import Rows, TextRows
from nikl_ray.handoff import FeatureOrder
from nikl_ray.placement import Placement
from nikl_ray.tasks import TaskSpec
from nikl_ray.tracking import Target

SELECT_METRIC = "eval_score"  # a run's score on its selection slice (decision.selection_score), as Tune sees it
# what Ray keeps a run's best checkpoint by: the selection score of an epoch that beat every earlier one, else
# below the best so far. HF's best model is the first of equal scores; Ray's best checkpoint would be the last.
CHECKPOINT_RANK = "checkpoint_rank"


def best_evaluated(history: list[dict]) -> dict | None:
    """The evaluated epoch of a run's history with the highest selection score (the first of equals,
    as HF keeps it), or None without a selection slice."""
    evals = [h for h in history if SELECT_METRIC in h]
    return max(evals, key=lambda h: h[SELECT_METRIC]) if evals else None


@dataclass(frozen=True)
class RowsPayload:
    """What workers need of the labelled rows (put into Ray's object store once per stage)."""

    ids: list[str]
    inputs: TextRows
    labels: np.ndarray
    test_ids: list[str] = field(default_factory=list)  # the unlabelled rows fold models answer for
    test: TextRows | None = None
    # what the training rows learn from where it is not their labels: a distilled student's soft
    # targets (the ensemble's probabilities); selection and held-out rows are scored on `labels`
    targets: np.ndarray | None = None

    @classmethod
    def of(cls, rows: Rows, test: Rows | None = None) -> "RowsPayload":
        return cls(rows.ids, rows.inputs(), rows.labels, test.ids if test is not None else [],
                   test.inputs() if test is not None else None)


@dataclass(frozen=True)
class Device:
    """How a stage's trials run, resolved once from the experiment and the cluster."""

    schedule_gpu: bool  # ask Ray for card shares
    device: str  # "cuda" only where the cards are real CUDA devices ("cpu" on a simulated GPU cluster)
    bf16: bool = False

    @classmethod
    def resolve(cls, use_gpu: bool | None, gpus: float, cards: list) -> "Device":
        schedule = use_gpu if use_gpu is not None else gpus > 0
        real = schedule and bool(cards) and all(c.cuda for c in cards)
        return cls(schedule, "cuda" if real else "cpu", real and all(c.bf16 for c in cards))

    def precision(self, spec: BackboneSpec) -> str:
        if self.device != "cuda":
            return "fp32"
        if spec.precision == "auto":
            return "bf16" if self.bf16 else "fp16"
        return spec.precision

    def gradient_checkpointing(self, spec: BackboneSpec) -> bool:
        return spec.checkpointing_on(gpu=self.device == "cuda")


@dataclass(frozen=True)
class FoldRun:
    backbone: BackboneSpec
    task: TaskSpec
    fold: int
    name: str  # Ray Train's run name (the dashboard lists it)
    storage: str  # Ray Train's storage path: the run lives in <storage>/<name>
    data: Any  # ObjectRef of a RowsPayload (or the payload itself)
    train_idx: np.ndarray
    select_idx: np.ndarray  # chooses the epoch; empty: train every epoch, keep the last
    heldout_idx: np.ndarray
    device: str
    precision: str
    gradient_checkpointing: bool
    placement: Placement
    max_failures: int
    predict_heldout: bool = True  # score the held-out fold once at the end (not in tune trials)
    features: FeatureOrder | None = None  # a final run's features to write (handoff)
    tracking: Target | None = None  # where its rank 0 logs (None: nowhere; progress lines every 30 s)

    @property
    def memory_fraction(self) -> float | None:
        return self.placement.memory_fraction if self.device == "cuda" else None

    @property
    def estimate_gb(self) -> float | None:
        return self.placement.estimate_gb

    @property
    def schedule_gpu(self) -> bool:
        return self.placement.gpu_share > 0


def payload_of(rows, test=None):
    """What a stage puts into Ray's object store for its workers: a RowsPayload, or a generate task's QAPayload."""
    if rows.task.generates:
        from nikl_ray.qa.sft import QAPayload

        return QAPayload.of(rows, test)
    return RowsPayload.of(rows, test)


def fold_run(exp, spec: BackboneSpec, fold: int, positions: tuple, data, placement: Placement, device: Device, *,
             name: str, storage: str, predict_heldout: bool = True, features: FeatureOrder | None = None,
             tracking: Target | None = None) -> FoldRun:
    """The run of `spec` on `fold`; `positions` = (train, selection, held-out) row positions."""
    train, select, held = positions
    return FoldRun(spec, exp.task, fold, name, storage, data, train, select, held, device.device, device.precision(spec),
                   device.gradient_checkpointing(spec), placement, exp.resources.max_failures, predict_heldout, features,
                   tracking)


def final_run(exp, spec: BackboneSpec, fold: int, positions: tuple, data, placement: Placement, device: Device,
              order: FeatureOrder | None, tracking: Target | None = None) -> FoldRun:
    """A pair's final run, as the train stage fits it and the features stage reads its fold model."""
    return fold_run(exp, spec, fold, positions, data, placement, device, name=exp.layout.run_name(spec.name, fold),
                    storage=str(exp.layout.train), features=order, tracking=tracking)


def held_out_hash(folds: dict, fold: int) -> str:
    """What a fold model depends on besides its spec and data: which ids it held out and selected on."""
    text = "\n".join(folds["folds"][fold]) + "\n#select\n" + "\n".join(folds["select"][fold])
    return hashlib.sha256(text.encode()).hexdigest()


def answering_positions(test: Rows | None, k: int) -> list[np.ndarray]:
    """Per fold, the positions of the test rows its fold model answers for (none without a test set):
    every test row for a classifying task (the ensemble routes or bags them, `ensemble.test_rows`),
    the rows routed to the fold for a generating one (answers are costly, and MBR reads one per row)."""
    if test is None:
        return [np.zeros(0, int)] * k
    if not test.task.generates:
        return [np.arange(len(test))] * k
    fold_of = assign(row_keys(test), k, "fold")
    return [np.flatnonzero(fold_of == fold) for fold in range(k)]


def row_keys(rows) -> list[str]:
    """A stable key per row from what a model reads of it (its text and target; a generate task's
    first phrasing, the one a test item is asked by, and context): the same row, or the same
    question asked of a finished run, is always routed the same way."""
    if not rows.task.generates:
        return rows.inputs().keys()
    return [question_key(q[0], c) for q, c in zip(rows.questions, rows.contexts)]


def question_key(question: str, context: str | None) -> str:
    return hashlib.sha256(json.dumps([question.strip(), context or None], ensure_ascii=False).encode()).hexdigest()


def assign(keys: list[str], k: int, salt: str) -> np.ndarray:
    """A stable choice among k for each row key (which fold model, which inner fold answers for a
    test row): the same row always goes the same way, and rows spread evenly."""
    return np.array([int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) % k for key in keys], dtype=int)
