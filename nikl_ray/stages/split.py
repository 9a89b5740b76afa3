"""The split stage: which row ids are held out in which fold, and which choose each fold's epoch.

Multi-label tasks use iterative stratification (Sechidis et al., the `iterative-stratification`
package); single-label tasks use scikit-learn's stratified splitters. For each fold a
*selection slice* (`folds.selection` of its training rows, stratified) is set aside: the fold
model picks its epoch there, never on the held-out fold whose predictions become the
out-of-fold features. The manifest is tied to the data's hash, so every later stage agrees on
which row is where, and a changed file means new folds rather than a silent leak.
"""

from __future__ import annotations

import logging

from nikl_ray.artifacts import manifest_problem, read_json, write_json, write_manifest
from nikl_ray.data import Rows
from nikl_ray.folds import make_folds

log = logging.getLogger(__name__)


def run(exp, rows: Rows) -> dict:
    """Make (or reuse, when data, k, seed and selection match) the fold manifest. Returns it."""
    layout = exp.layout
    inputs = {"data_hash": rows.data_hash(), "k": exp.folds.k, "seed": exp.folds.seed, "selection": exp.folds.selection,
              "task": exp.task.model_dump(mode="json")}
    why = manifest_problem(layout.split, inputs, __name__)
    if why is None:
        return read_json(layout.folds)
    log.info("split: %s → making %d folds of %d rows", why, exp.folds.k, len(rows))
    manifest = make_folds(rows, exp.folds.k, exp.folds.seed, exp.folds.selection)
    write_json(layout.folds, manifest)
    write_manifest(layout.split, inputs=inputs, files=[layout.folds], code=__name__)
    return manifest
