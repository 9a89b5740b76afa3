"""Scores shared by training, the ensemble and reports (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support


def scores(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, float]:
    """micro-F1 (the NIKL metric), macro-F1 and per-label F1 of 0/1 matrices."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    out = {"micro_f1": f1_score(y_true, y_pred, average="micro", zero_division=0),
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
