"""Stratified folds and slices of labelled rows (the split stage writes them; the heads reuse them).

Multi-label rows use iterative stratification (Sechidis et al., the `iterative-stratification`
package); single-label rows use scikit-learn's stratified splitters.
"""

from __future__ import annotations

import numpy as np

from nikl_ray.data import Rows


def _splitter(multi_label: bool, k: int, seed: int):
    if multi_label:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        return MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)


def stratified_folds(labels: np.ndarray, multi_label: bool, k: int, seed: int) -> list[np.ndarray]:
    """Row positions held out in each of k stratified folds."""
    y = labels if multi_label else labels.argmax(1)
    return [held for _, held in _splitter(multi_label, k, seed).split(np.zeros((len(labels), 1)), y)]


def stratified_slice(labels: np.ndarray, multi_label: bool, fraction: float, seed: int) -> np.ndarray:
    """Positions of a stratified `fraction` of rows (empty for fraction 0)."""
    if fraction <= 0 or len(labels) < 4:
        return np.array([], dtype=int)
    if multi_label:
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit as Split

        y = labels
    else:
        from sklearn.model_selection import StratifiedShuffleSplit as Split

        y = labels.argmax(1)
    try:
        _, picked = next(Split(n_splits=1, test_size=fraction, random_state=seed).split(np.zeros((len(labels), 1)), y))
    except ValueError:  # a class too rare to stratify: a plain random slice
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(labels), max(1, int(round(fraction * len(labels)))), replace=False)
    return np.sort(picked)


def item_strata(strata: np.ndarray, k: int) -> np.ndarray:
    """One-hot strata of a generate task's items (a row is an item: all its phrasings and answers),
    strata with fewer than k items merged into one, and that one into the largest if still too small."""
    strata = np.asarray(strata)
    values, counts = np.unique(strata, return_counts=True)
    rare = set(values[counts < k].tolist())
    merged = np.array([-1 if s in rare else s for s in strata])
    if 0 < (merged == -1).sum() < k:
        merged[merged == -1] = values[counts.argmax()]
    return np.eye(len(np.unique(merged)))[np.unique(merged, return_inverse=True)[1]]


def make_folds(rows: Rows, k: int = 5, seed: int = 42, selection: float = 0.0) -> dict:
    """{k, seed, selection, data_hash, n_rows, folds: [[held-out ids]], select: [[selection ids]]}.
    A generate task's rows are its items, stratified by group (qa.data.QARows.strata)."""
    if not 2 <= k <= len(rows):
        raise ValueError(f"k must be between 2 and the number of rows ({len(rows)}), got {k}")
    if rows.task.generates:
        y, multi = item_strata(rows.strata(), k), False
    elif rows.labels is None:
        raise ValueError("folds need labelled rows")
    else:
        y, multi = rows.labels, rows.task.multi_label
    folds, select = [], []
    for f, held in enumerate(stratified_folds(y, multi, k, seed)):
        train = np.setdiff1d(np.arange(len(rows)), held)
        picked = train[stratified_slice(y[train], multi, selection, seed + 1 + f)]
        folds.append(sorted(rows.ids[i] for i in held))
        select.append(sorted(rows.ids[i] for i in picked))
    return {"k": k, "seed": seed, "selection": selection, "data_hash": rows.data_hash(), "n_rows": len(rows),
            "folds": folds, "select": select}


def fold_positions(rows: Rows, folds: dict, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, selection, held-out) row positions of one fold, each in file order."""
    held, select = set(folds["folds"][fold]), set(folds["select"][fold])
    where = np.array([0 if rid in held else 1 if rid in select else 2 for rid in rows.ids])
    return np.flatnonzero(where == 2), np.flatnonzero(where == 1), np.flatnonzero(where == 0)
