"""Decision rules: probabilities → labels, their fitted parameters, and honest scores for them.

Multi-label rules: `threshold_0.5`; one `global_threshold`; `per_label_thresholds`
(coordinate ascent on the overall micro-F1); `at_least_one` (a global threshold, and the
top label for a row that would get none). Single-label tasks: `argmax`.

A rule's parameters are fitted on some rows and scored on others: `crossfit` fits them on all
inner folds but one and applies them to that one, for each fold in turn, so every row's decision
comes from parameters that never saw its label. Choices (which rule, which ensemble) are made on
those scores; the in-sample score (fitted and scored on the same rows) is reported only as such.
The threshold grids are evaluated with sorted cumulative counts, not one pass per threshold.
"""

from __future__ import annotations

import numpy as np

from nikl_ray.metrics import primary_score

MULTI_LABEL_RULES = ("threshold_0.5", "global_threshold", "per_label_thresholds", "at_least_one")
GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


def rules_for(multi_label: bool) -> tuple[str, ...]:
    return MULTI_LABEL_RULES if multi_label else ("argmax",)


def thresholds(rule: str, params: dict | None, n_labels: int) -> np.ndarray:
    """Each label's threshold under `rule` (argmax has none: nan)."""
    params = params or {}
    if rule == "argmax":
        return np.full(n_labels, np.nan)
    if rule == "threshold_0.5":
        return np.full(n_labels, 0.5)
    if rule in ("global_threshold", "at_least_one"):
        return np.full(n_labels, params["threshold"], dtype=float)
    if rule == "per_label_thresholds":
        return np.asarray(params["thresholds"], dtype=float)
    raise ValueError(f"unknown decision rule {rule!r}")


def decide(probs: np.ndarray, rule: str, params: dict | None = None) -> np.ndarray:
    """(n, L) bool decisions of `rule` with `params`."""
    probs = np.asarray(probs)
    if rule == "argmax":
        out = np.zeros(probs.shape, dtype=bool)
        out[np.arange(len(probs)), probs.argmax(1)] = True
        return out
    out = probs >= thresholds(rule, params, probs.shape[1])
    if rule == "at_least_one":  # a row with no label above the threshold gets its likeliest one
        out[np.arange(len(probs)), probs.argmax(1)] |= ~out.any(1)
    return out


def _at_or_above(p: np.ndarray, y: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each threshold t of `grid`: (#p ≥ t, #(p ≥ t and y))."""
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order].astype(np.int64)
    suffix = np.concatenate([np.cumsum(ys[::-1])[::-1], [0]])
    idx = np.searchsorted(ps, grid, side="left")
    return len(p) - idx, suffix[idx]


def _below(m: np.ndarray, c: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each threshold t: (#m < t, #(m < t and c))."""
    order = np.argsort(m, kind="stable")
    prefix = np.concatenate([[0], np.cumsum(c[order].astype(np.int64))])
    idx = np.searchsorted(m[order], grid, side="left")
    return idx, prefix[idx]


def _f1(tp, pred, positives):
    denom = pred + positives
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def fit_rule(probs: np.ndarray, y: np.ndarray, rule: str) -> dict:
    """The rule's parameters that maximise micro-F1 on (probs, y) (the lowest threshold among ties)."""
    if rule in ("threshold_0.5", "argmax"):
        return {}
    y = np.asarray(y) > 0
    positives = y.sum()
    pred, tp = _at_or_above(probs.ravel(), y.ravel(), GRID)
    if rule == "global_threshold":
        return {"threshold": float(GRID[np.argmax(_f1(tp, pred, positives))])}
    if rule == "at_least_one":
        top = probs.argmax(1)
        extra_pred, extra_tp = _below(probs.max(1), y[np.arange(len(y)), top], GRID)
        return {"threshold": float(GRID[np.argmax(_f1(tp + extra_tp, pred + extra_pred, positives))])}
    if rule == "per_label_thresholds":
        t = np.full(probs.shape[1], fit_rule(probs, y, "global_threshold")["threshold"])
        counts = [_at_or_above(probs[:, j], y[:, j], GRID) for j in range(probs.shape[1])]
        at = lambda j: int(np.searchsorted(GRID, t[j] - 1e-9))  # noqa: E731 - grid index of label j's threshold
        for _ in range(2):  # coordinate ascent on the overall micro-F1
            for j in range(len(t)):
                rest_pred = sum(counts[i][0][at(i)] for i in range(len(t)) if i != j)
                rest_tp = sum(counts[i][1][at(i)] for i in range(len(t)) if i != j)
                t[j] = GRID[np.argmax(_f1(rest_tp + counts[j][1], rest_pred + counts[j][0], positives))]
        return {"thresholds": [float(v) for v in t]}
    raise ValueError(f"unknown decision rule {rule!r}")


def crossfit(probs: np.ndarray, y: np.ndarray, rule: str, groups: np.ndarray) -> np.ndarray:
    """Decisions for every row from the rule fitted on the rows of the other groups."""
    out = np.zeros(probs.shape, dtype=bool)
    for g in np.unique(groups):
        held = groups == g
        out[held] = decide(probs[held], rule, fit_rule(probs[~held], y[~held], rule))
    return out


def score_rules(probs: np.ndarray, y: np.ndarray, multi_label: bool, groups: np.ndarray) -> dict:
    """{rule: {crossfit, in_sample, params}}: params are fitted on every row (what the test rows get);
    `crossfit` is the honest score of that procedure, `in_sample` the optimistic one."""
    out = {}
    for rule in rules_for(multi_label):
        params = fit_rule(probs, y, rule)
        out[rule] = {"crossfit": primary_score(y, crossfit(probs, y, rule, groups), multi_label),
                     "in_sample": primary_score(y, decide(probs, rule, params), multi_label), "params": params}
    return out


def selection_score(probs: np.ndarray, y: np.ndarray, multi_label: bool) -> float:
    """What a fold model's epoch (and a tune trial) is chosen by, on its selection slice: micro-F1 at
    the slice's best global threshold (a weak model's probabilities rarely cross 0.5, and the ensemble
    fits its own thresholds anyway), or accuracy for single-label tasks."""
    rule = "global_threshold" if multi_label else "argmax"
    return primary_score(y, decide(probs, rule, fit_rule(probs, y, rule)), multi_label)


def best_rule(by_rule: dict) -> str:
    """The rule with the best cross-fitted score (the simplest among ties: rules are in order of complexity)."""
    return max(by_rule, key=lambda r: by_rule[r]["crossfit"])
