"""The stages in order, each skipped when its manifest is complete: one entry for CLI and ray jobs."""

from __future__ import annotations

from nikl_ray.config import ConfigError, Experiment
from nikl_ray.data import Rows, read_rows


def load_inputs(exp: Experiment) -> tuple[Rows, Rows | None]:
    """Labelled rows and test rows, validated; test ids must not collide with training ids."""
    rows = read_rows(exp.train, exp.task, labelled=True)
    test = read_rows(exp.test, exp.task, labelled=False) if exp.test else None
    if test is not None:
        clash = sorted(set(rows.ids) & set(test.ids))
        if clash:
            raise ConfigError(f"{exp.test}: {len(clash)} test id(s) also appear in the training data, "
                              f"e.g. {clash[:5]}")
    return rows, test
