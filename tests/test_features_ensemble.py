"""Features of trained tiny fold models, the stacked ensemble and the submission (real Ray tasks)."""

import json

import numpy as np
import pytest
import torch

from nikl_ray.artifacts import read_json
from nikl_ray.data import read_rows
from nikl_ray.ensemble import decide, ensemble_stage, fit_rule, train_head
from nikl_ray.features import embed, features_stage, load_member, load_trained, pool
from nikl_ray.artifacts import load_manifest
from nikl_ray.predict import predict_rows
from nikl_ray.train import pair_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stacked(trained):
    exp, rows, folds, test, _ = trained
    features_stage(exp, rows, folds, test)
    return exp, rows, folds, test, ensemble_stage(exp, rows, folds, test)


def test_pooling_takes_the_last_real_token_under_left_and_right_padding():
    hidden = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert pool(hidden, right, "decoder").flatten().tolist() == [2, 9]
    assert pool(hidden, left, "decoder").flatten().tolist() == [4, 9]
    assert pool(hidden, right, "encoder").flatten().tolist() == [0, 5]
    assert pool(hidden, left, "encoder").flatten().tolist() == [2, 5]


def test_embedding_does_not_depend_on_row_order(trained):
    exp, rows = trained[:2]
    spec = exp.backbone("neox-lora")
    ckpt = pair_dir(exp, "neox-lora", 0) / load_manifest(pair_dir(exp, "neox-lora", 0))["best_checkpoint"]
    tok, model = load_trained(spec, ckpt, 8, True)
    sub = rows.take(range(40))
    h1, p1 = embed(spec, tok, model, sub.texts, sub.targets, True, batch_size=8)
    rev = list(reversed(range(40)))
    h2, p2 = embed(spec, tok, model, [sub.texts[i] for i in rev], [sub.targets[i] for i in rev], True, batch_size=8)
    np.testing.assert_allclose(h1, h2[rev], atol=1e-4)
    np.testing.assert_allclose(p1, p2[rev], atol=1e-5)


def test_features_of_two_backbones_join_by_id_even_when_rows_are_shuffled(stacked):
    exp, rows, folds, test, _ = stacked
    perm = np.random.default_rng(0).permutation(len(rows))
    shuffled_ids = [rows.ids[i] for i in perm]
    for member in ("enc-full", "neox-lora"):
        h, p, test_parts = load_member(exp, member, folds["k"], rows.ids, test.ids)
        hs, ps, _ = load_member(exp, member, folds["k"], shuffled_ids, test.ids)
        np.testing.assert_array_equal(hs, h[perm])
        np.testing.assert_array_equal(ps, p[perm])
        assert h.shape == (len(rows), 64) and p.shape == (len(rows), 8) and len(test_parts) == 2
    # each row's features come from the fold model that held it out
    held0 = set(folds["folds"][0])
    ids0 = json.loads((exp.results / "features" / "neox-lora" / "fold0" / "oof_ids.json").read_text())
    assert set(ids0) == held0


def test_ensemble_heads_ran_as_parallel_ray_tasks(stacked):
    report = read_json(stacked[0].results / "ensemble" / "report.json")
    heads = sorted(report["heads"], key=lambda h: h["start"])
    assert len(heads) == 4  # 2 hidden sizes × 2 inner folds
    overlaps = sum(1 for a, b in zip(heads, heads[1:]) if b["start"] < a["end"])
    assert overlaps >= 1, heads


def test_report_compares_members_simple_ensembles_and_the_stack(stacked):
    exp = stacked[0]
    report = read_json(exp.results / "ensemble" / "report.json")
    assert set(report["table"]) == {"enc-full", "neox-lora", "neox-qlora", "tfidf-lr", "prob-average", "majority-vote", "stack"}
    assert set(report["table"]["stack"]) == {"threshold_0.5", "global_threshold", "per_label_thresholds", "at_least_one"}
    assert len(report["per_label"]) == 8
    png = (exp.results / "ensemble" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| stack |" in (exp.results / "ensemble" / "report.md").read_text()


def test_submission_validates_against_the_nikl_reader_and_matches_input_ids(stacked):
    exp, _, _, test, _ = stacked
    sub = read_rows(exp.results / "ensemble" / "submission.jsonl", exp.task, labelled=True)
    assert sub.ids == test.ids
    assert [r["input"] for r in sub.records] == [r["input"] for r in test.records]


def test_single_sentence_prediction_matches_the_submission(stacked):
    exp, _, _, test, _ = stacked
    probs = predict_rows(exp, test.texts[:3], test.targets[:3])
    decision = read_json(exp.results / "ensemble" / "decision.json")
    sub = read_rows(exp.results / "ensemble" / "submission.jsonl", exp.task, labelled=True)
    np.testing.assert_array_equal(decide(probs, decision["rule"], decision["params"]), sub.labels[:3].astype(bool))


def test_heads_learn_a_known_signal_far_above_chance(ray_local):
    import ray

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 20)).astype(np.float32)
    w = rng.normal(size=(20, 4))
    y = (x @ w > 0.5).astype(np.float32)
    job = {"hidden": 32, "inner_fold": 0, "train_idx": np.arange(450), "val_idx": np.arange(450, 600), "seed": 0,
           "multi_label": True, "config": {"epochs": 200, "patience": 20}}
    out = ray.get(ray.remote(num_cpus=1)(train_head).remote(job, x, y, [x[:5]]))
    pred = decide(out["val_probs"], "global_threshold", fit_rule(out["val_probs"], y[450:], "global_threshold"))
    tp = (pred & (y[450:] > 0)).sum()
    f1 = 2 * tp / (pred.sum() + y[450:].sum())
    chance = 2 * y.mean() / (1 + 2 * y.mean())  # F1 of predicting every label everywhere
    assert f1 > 0.85 and f1 > chance + 0.3, (f1, chance)
    assert out["test_probs"].shape == (5, 4)
