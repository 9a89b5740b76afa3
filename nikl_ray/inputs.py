"""The rows a run starts from: labelled rows and test rows, read and validated once per command."""

from __future__ import annotations

from dataclasses import dataclass

from nikl_ray.artifacts import read_json
from nikl_ray.config import ConfigError, Experiment
from nikl_ray.data import Rows, read_rows


@dataclass
class Inputs:
    rows: Rows
    test: Rows | None

    def folds(self, exp: Experiment) -> dict:
        """The split stage's fold manifest (the split stage must have run)."""
        path = exp.layout.folds
        if not path.exists():
            raise ConfigError(f"no folds in {path}: run `nikl-ray split` (or the pipeline) first")
        folds = read_json(path)
        if folds["data_hash"] != self.rows.data_hash():
            raise ConfigError(f"{path} was made from other data: run `nikl-ray split` again")
        return folds


def load_inputs(exp: Experiment) -> Inputs:
    """Labelled rows and test rows, validated; test ids must not collide with training ids."""
    rows = read_rows(exp.train, exp.task, labelled=True)
    test = read_rows(exp.test, exp.task, labelled=False) if exp.test else None
    if test is not None:
        clash = sorted(set(rows.ids) & set(test.ids))
        if clash:
            raise ConfigError(f"{exp.test}: {len(clash)} test id(s) also appear in the training data, "
                              f"e.g. {clash[:5]}")
    return Inputs(rows, test)
