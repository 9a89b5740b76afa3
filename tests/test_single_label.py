"""The neighbouring task end to end: NSMC-style single-label sentiment (tsv), real reviews."""

import json
from itertools import islice

import pytest

from conftest import NSMC_DIR

pytestmark = pytest.mark.skipif(not NSMC_DIR.exists(), reason="../shared/data/nsmc_like is absent")


def _head(src, dst, n):
    """The header and first n rows of a real file, into the test's own folder (never the repo)."""
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(islice(f, n + 1)), encoding="utf-8")
    return dst


@pytest.mark.slow
def test_sentence_sentiment_pipeline_writes_a_tsv_submission(tmp_path, tiny_backbones, ray_local):
    from nikl_ray.artifacts import load_manifest
    from nikl_ray.config import parse_experiment
    from nikl_ray.data import read_rows
    from nikl_ray.pipeline import run_pipeline
    from nikl_ray.train import pair_dir, read_history

    train = _head(NSMC_DIR / "ratings_train.txt", tmp_path / "train.txt", 600)
    test = _head(NSMC_DIR / "ratings_test.txt", tmp_path / "test.txt", 80)
    exp = parse_experiment({
        "task": "sentence-sentiment", "train": str(train), "test": str(test), "results": str(tmp_path / "res"),
        "folds": {"k": 2, "seed": 0},
        "defaults": {"epochs": 2, "batch_size": 32, "max_length": 48, "lr": 5e-3},
        # one neural member (cross-entropy through the same Trainer path for every family) + TF-IDF
        "backbones": [{"name": "neox", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora"}],
        "ensemble": {"hidden_sizes": [16, 32], "inner_folds": 2, "epochs": 60, "patience": 10}}, tmp_path)
    out = run_pipeline(exp)

    # Cross-entropy over the two classes: the held-out metrics the worker logged are single-label ones.
    m = load_manifest(pair_dir(exp, "neox", 0))
    evals = [h for h in read_history((pair_dir(exp, "neox", 0) / m["best_checkpoint"]).parent) if "eval_micro_f1" in h]
    assert evals and {"eval_f1_negative", "eval_f1_positive"} <= set(evals[0])

    sub = out["submission"]
    assert sub.name == "submission.txt"
    lines = sub.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id\tdocument\tlabel"
    written = read_rows(sub, exp.task)  # the task's own reader accepts it
    given = read_rows(test, exp.task)
    assert written.ids == given.ids and written.texts == given.texts
    assert {line.rsplit("\t", 1)[1] for line in lines[1:]} <= {"0", "1"}

    report = json.loads(out["report"].with_suffix(".json").read_text())
    assert set(report["members"]) == {"neox", "tfidf-lr"}
    # exactly one class per row, so micro-F1 is accuracy; on balanced reviews chance is ~0.5
    assert report["stack_oof_scores"]["micro_f1"] > 0.6, report["table"]
