"""The classical member (scikit-learn, no Ray) and what its features stage manifest is tied to."""

import numpy as np

from conftest import DEMO_DIR
from nikl_ray.data import read_rows
from nikl_ray.members import classical_probs, fit_classical
from nikl_ray.tasks import get_task


def test_a_label_with_no_positive_row_in_a_fold_gets_a_constant_model():
    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion"))
    labels = rows.labels.copy()
    labels[:, 5] = 0  # e.g. `fear` absent from this fold's training rows
    model = fit_classical(rows.inputs(), labels, True)
    probs = classical_probs(model, rows.inputs(), True)
    assert probs.shape == labels.shape and np.isfinite(probs).all()
    assert probs[:, 5].max() < 1e-3 and probs[:, 0].std() > 0.05


def test_binary_single_label_probabilities_are_two_columns_that_sum_to_one():
    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion"))
    y = np.eye(2, dtype=np.float32)[rows.labels[:, 0].astype(int)]  # joy or not, as one label a row
    probs = classical_probs(fit_classical(rows.inputs(), y, False), rows.inputs(), False)
    assert probs.shape == (len(rows), 2)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert ((probs[:, 1] > 0.5) == (y[:, 1] > 0)).mean() > 0.8  # and they mean something
