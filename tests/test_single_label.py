"""The neighbouring task end to end: NSMC-style single-label sentiment (tsv), real reviews."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_sentence_sentiment_pipeline_writes_a_tsv_submission_and_scores_accuracy(single_label_run):
    from nikl_ray.artifacts import load_manifest
    from nikl_ray.config import parse_experiment
    from nikl_ray.data import read_rows
    from nikl_ray.runfiles import read_history

    raw, out = single_label_run
    exp = parse_experiment(raw)
    # Cross-entropy over the two classes: the held-out metrics are single-label ones, named so.
    m = load_manifest(exp.layout.pair("neox", 0))
    evals = [h for h in read_history((exp.layout.pair("neox", 0) / m["best_checkpoint"]).parent) if "eval_score" in h]
    assert evals and {"eval_accuracy", "eval_f1_negative", "eval_f1_positive"} <= set(evals[0])
    assert "eval_micro_f1" not in evals[0] and "heldout_accuracy" in m
    assert "held-out accuracy" in exp.layout.train_summary.with_suffix(".md").read_text()

    sub = out["submission"]
    assert sub.name == "submission.txt"
    lines = sub.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id\tdocument\tlabel"
    written, given = read_rows(sub, exp.task), read_rows(raw["test"], exp.task)  # the task's own reader accepts it
    assert written.ids == given.ids and written.texts == given.texts
    assert {line.rsplit("\t", 1)[1] for line in lines[1:]} <= {"0", "1"}

    report = json.loads(out["report"].with_suffix(".json").read_text())
    assert set(report["members"]) == {"neox", "tfidf-lr", "nbsvm", "use-lr"} and report["metric"] == "accuracy"
    assert all(set(r) == {"argmax"} for r in report["table"].values())  # no empty rule columns
    md = out["report"].read_text()
    assert "out-of-fold accuracy" in md and "micro" not in md and "threshold" not in md
    assert report["chosen"]["score"] > 0.6, report["crossfit_score"]  # balanced reviews: chance is ~0.5


def test_each_classical_member_gives_two_proper_probabilities_for_a_binary_task(single_label_run):
    from nikl_ray.config import parse_experiment
    from nikl_ray.data import read_rows
    from nikl_ray.members import load_member

    raw, _ = single_label_run
    exp = parse_experiment(raw)
    rows = read_rows(exp.train, exp.task)
    for member in ("tfidf-lr", "nbsvm", "use-lr"):
        f = load_member(exp.layout, member, 2, rows.ids, None)
        assert f.oof_probs.shape == (len(rows), 2)
        np.testing.assert_allclose(f.oof_probs.sum(1), 1, atol=1e-5)
        assert f.oof_probs[:, 1].std() > 0.01, member  # not a softmax over one logit (always 1.0)
        assert ((f.oof_probs[:, 1] > 0.5) == (rows.labels[:, 1] > 0)).mean() > 0.6, member


def test_the_public_api_runs_and_answers_for_a_whole_run(single_label_run):
    """The run the fixture made through `nikl_ray.open_run` and `nikl_ray.pipeline` alone, used through
    `nikl_ray` alone: a second pipeline call does nothing, the Predictor answers as the submission did."""
    import nikl_ray as nr

    raw, out = single_label_run
    run = nr.open_run(raw)
    stamps = {p: p.stat().st_mtime_ns for p in run.results.rglob("manifest.json")}
    assert nr.pipeline(run)["chosen"] == out["chosen"]
    assert stamps == {p: p.stat().st_mtime_ns for p in run.results.rglob("manifest.json")}
    predictor = nr.Predictor.load(run.results)
    submitted = out["submission"].read_text(encoding="utf-8").splitlines()[1:4]
    for line in submitted:
        _, text, label = line.split("\t")
        probs, labels = predictor.predict_text(text)
        assert labels == [predictor.task.labels[int(label)]] and set(probs) == {"negative", "positive"}
    board = predictor.leaderboard()
    assert [row["ensemble"] for row in board if row["role"] == "submitted"] == [out["chosen"]]
    assert set(nr.__all__) >= {"open_run", "split", "pretrain", "tune", "train", "features", "ensemble", "pipeline",
                               "Predictor"}
