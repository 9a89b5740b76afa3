"""Scores shared by training, the ensemble and reports.

Multi-label tasks are scored by micro-F1 (the NIKL metric); single-label tasks by accuracy
(which is what micro-F1 amounts to with one label a row) and macro-F1, under those names.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support


def metric_name(multi_label: bool) -> str:
    """The task's primary score, as it is named in logs, tables and reports."""
    return "micro_f1" if multi_label else "accuracy"


def task_metric(task) -> str:
    """The name of a task's primary score: a generate task's answer metric, else metric_name."""
    return task.metric if task.generates else metric_name(task.multi_label)


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """micro-F1 of 0/1 matrices (numpy, fast enough for threshold grids)."""
    y, p = np.asarray(y_true) > 0, np.asarray(y_pred).astype(bool)
    denom = float(p.sum() + y.sum())
    return 2 * float((p & y).sum()) / denom if denom else 0.0


def primary_score(y_true: np.ndarray, y_pred: np.ndarray, multi_label: bool) -> float:
    """micro-F1 (multi-label) or accuracy (single-label, one-hot rows) of 0/1 matrices."""
    if multi_label:
        return micro_f1(y_true, y_pred)
    return float((np.asarray(y_true).argmax(1) == np.asarray(y_pred).argmax(1)).mean())


def scores(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], multi_label: bool = True) -> dict[str, float]:
    """The primary score, macro-F1 and per-label F1 of 0/1 matrices."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    out = {metric_name(multi_label): primary_score(y_true, y_pred, multi_label),
           "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0)}
    per = f1_score(y_true, y_pred, average=None, zero_division=0)
    out.update({f"f1_{lab}": float(f) for lab, f in zip(labels, per)})
    return {k: float(v) for k, v in out.items()}


def per_label_table(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> list[dict]:
    p, r, f, support = precision_recall_fscore_support(np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int),
                                                       zero_division=0)
    return [{"label": lab, "precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
            for lab, pi, ri, fi, si in zip(labels, p, r, f, support)]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def to_probs(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    return sigmoid(logits) if multi_label else softmax(logits)
