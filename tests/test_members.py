"""The classical members (scikit-learn, no Ray) and what their features stage manifest is tied to."""

import numpy as np
import pytest

from conftest import DEMO_DIR
from nikl_ray.data import read_rows
from nikl_ray.members import CLASSICAL, SentenceVectors, classical_probs, fit_classical, load_classical, save_classical
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


@pytest.mark.parametrize("name", list(CLASSICAL))
def test_each_classical_member_predicts_rows_it_never_saw_and_stores_without_pickle(name, tmp_path):
    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion"))
    fit, held = np.arange(len(rows)) % 4 != 0, np.arange(len(rows)) % 4 == 0
    labels = rows.labels.copy()
    labels[:, 5] = 0  # a label with no positive row: constant, whatever the classifier
    model = fit_classical(rows.inputs().take(np.flatnonzero(fit)), labels[fit], True, name)
    save_classical(tmp_path, model)
    assert not list(tmp_path.glob("*.pkl")) and (tmp_path / "model.json").exists()
    probs = classical_probs(load_classical(tmp_path), rows.inputs().take(np.flatnonzero(held)), True)
    np.testing.assert_allclose(probs, classical_probs(model, rows.inputs().take(np.flatnonzero(held)), True), atol=1e-6)
    y = labels[held] > 0
    assert probs[:, 5].max() < 1e-3
    # better than chance on unseen rows, and calibrated to within 0.15 of the positive rate per label
    auc_like = [(probs[y[:, j], j].mean() > probs[~y[:, j], j].mean()) for j in range(8) if 0 < y[:, j].sum() < len(y)]
    assert np.mean(auc_like) == 1, name
    assert np.abs(probs.mean(0) - y.mean(0)).max() < 0.15, (name, probs.mean(0), y.mean(0))


def test_a_character_model_saved_before_the_word_views_loads_as_it_was(tmp_path):
    from nikl_ray.artifacts import save_npy, write_json

    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion"))
    model = fit_classical(rows.inputs(), rows.labels, True)
    write_json(tmp_path / "model_vocabulary.json", model["vocabularies"]["char_wb"])  # the earlier layout
    for k in ("idf", "coef", "intercept"):
        save_npy(tmp_path / f"model_{k}.npy", model[k])
    np.testing.assert_array_equal(classical_probs(load_classical(tmp_path), rows.inputs(), True),
                                  classical_probs(model, rows.inputs(), True))


def test_nbsvm_three_classes_one_vs_rest_sum_to_one():
    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion"))
    y = np.eye(3, dtype=np.float32)[(rows.labels[:, 0] + rows.labels[:, 1]).astype(int)]
    model = fit_classical(rows.inputs(), y, False, "nbsvm")
    probs = classical_probs(model, rows.inputs(), False)
    assert model["link"] == "ovr" and probs.shape == (len(rows), 3)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert classical_probs(model, rows.inputs().take(np.array([], int)), False).shape == (0, 3)


def test_sentence_vectors_embed_each_string_once_and_read_a_row_the_same_from_any_instance():
    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion")).inputs()
    shared = SentenceVectors()
    x = shared(rows)
    assert x.shape == (len(rows), 1024) and len(shared.index) == len(set(rows.texts) | set(rows.targets))
    part = rows.take(range(0, len(rows), 3))
    before = len(shared.index)
    np.testing.assert_allclose(shared(part), SentenceVectors()(part), atol=1e-5)  # the same row, the same vector
    assert len(shared.index) == before  # nothing embedded twice
    # text and target sit side by side: rows with one text and two targets differ in the second half only
    pair = SentenceVectors()(type(rows)([rows.texts[0]] * 2, ["사람", "노래"], [None, None]))
    np.testing.assert_allclose(pair[0, :512], pair[1, :512], atol=1e-6)
    assert np.abs(pair[0, 512:] - pair[1, 512:]).max() > 0.01
