"""Stratified K-fold manifests: which row ids are held out in which fold.

Multi-label tasks use iterative stratification (Sechidis et al., the `iterative-stratification`
package); single-label tasks use scikit-learn's StratifiedKFold. The manifest is tied to the
hash of the data files, so every later stage agrees on which row is where, and reloading it
against changed data is an error rather than a silent leak between folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nikl_ray.artifacts import read_json, write_json
from nikl_ray.data import Rows


class FoldMismatchError(ValueError):
    pass


def make_folds(rows: Rows, k: int = 5, seed: int = 42) -> dict:
    """A fold manifest: {k, seed, data_hash, n_rows, folds: [[held-out ids of fold 0], …]}."""
    if rows.labels is None:
        raise ValueError("folds need labelled rows")
    if not 2 <= k <= len(rows):
        raise ValueError(f"k must be between 2 and the number of rows ({len(rows)}), got {k}")
    x = np.zeros((len(rows), 1))
    if rows.task.multi_label:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(x, rows.labels)
    else:
        from sklearn.model_selection import StratifiedKFold

        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, rows.labels.argmax(1))
    folds = [sorted(rows.ids[i] for i in held_out) for _, held_out in splits]
    return {"k": k, "seed": seed, "data_hash": rows.data_hash(), "n_rows": len(rows), "folds": folds}


def save_folds(manifest: dict, path: str | Path) -> Path:
    return write_json(path, manifest)


def load_folds(path: str | Path, rows: Rows) -> dict:
    """Load a fold manifest and check that it was made from exactly these rows."""
    manifest = read_json(path)
    if manifest["data_hash"] != rows.data_hash():
        raise FoldMismatchError(f"{path}: fold manifest was made from other data (hash "
                                f"{manifest['data_hash'][:12]}…, data now {rows.data_hash()[:12]}…); "
                                "delete it or split again")
    held = {i for fold in manifest["folds"] for i in fold}
    if held != set(rows.ids):
        raise FoldMismatchError(f"{path}: fold ids do not cover the data's ids")
    return manifest


def fold_rows(rows: Rows, manifest: dict, fold: int) -> tuple[Rows, Rows]:
    """(train rows, held-out rows) of one fold, each in file order."""
    held = set(manifest["folds"][fold])
    train_idx = [i for i, rid in enumerate(rows.ids) if rid not in held]
    val_idx = [i for i, rid in enumerate(rows.ids) if rid in held]
    return rows.take(train_idx), rows.take(val_idx)


def split_stage(exp, rows: Rows) -> dict:
    """The split stage: reuse `<results>/folds.json` when it matches data, k and seed; else make it."""
    path = Path(exp.results) / "folds.json"
    if path.exists():
        try:
            manifest = load_folds(path, rows)
            if (manifest["k"], manifest["seed"]) == (exp.folds.k, exp.folds.seed):
                return manifest
            reason = "k or seed changed"
        except FoldMismatchError as e:
            reason = str(e)
        print(f"split: remaking folds ({reason})", flush=True)
    manifest = make_folds(rows, exp.folds.k, exp.folds.seed)
    save_folds(manifest, path)
    print(f"split: {len(rows)} rows → {exp.folds.k} folds in {path}", flush=True)
    return manifest
