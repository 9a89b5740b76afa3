"""Features of trained tiny fold models, the stacked ensemble, honest selection and the submission."""

import json

import numpy as np
import pytest
import torch

from nikl_ray.artifacts import load_manifest, read_json, write_json
from nikl_ray.data import read_rows
from nikl_ray.members import load_member, pool, read_features
from nikl_ray.runspec import assign

pytestmark = pytest.mark.slow


def test_pooling_takes_the_last_real_token_under_left_and_right_padding():
    hidden = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert pool(hidden, right, "decoder").flatten().tolist() == [2, 9]
    assert pool(hidden, left, "decoder").flatten().tolist() == [4, 9]
    assert pool(hidden, right, "encoder").flatten().tolist() == [0, 5]
    assert pool(hidden, left, "encoder").flatten().tolist() == [2, 5]


def test_embedding_does_not_depend_on_row_order(trained):
    from nikl_ray.backbones import load_trained
    from nikl_ray.members import embed

    exp, data, _ = trained
    spec, pair = exp.backbone("neox-lora"), exp.layout.pair("neox-lora", 0)
    tok, model = load_trained(spec, pair / load_manifest(pair)["best_checkpoint"], 8, True)
    rows = data.rows.inputs().take(range(40))
    h1, p1 = embed(spec, tok, model, rows, True, batch_size=8)
    rev = list(reversed(range(40)))
    h2, p2 = embed(spec, tok, model, rows.take(rev), True, batch_size=8)
    np.testing.assert_allclose(h1, h2[rev], atol=1e-4)
    np.testing.assert_allclose(p1, p2[rev], atol=1e-5)


def test_features_join_by_id_each_oof_row_from_the_fold_model_that_never_saw_it_each_test_row_from_all(stacked):
    exp, data, _ = stacked
    rows, test, folds = data.rows, data.test, data.folds(exp)
    perm = np.random.default_rng(0).permutation(len(rows))
    for member in ("enc-full", "neox-lora", "tfidf-lr"):
        f = load_member(exp.layout, member, 2, rows.ids, test.ids)
        g = load_member(exp.layout, member, 2, [rows.ids[i] for i in perm], test.ids)
        np.testing.assert_array_equal(g.oof_probs, f.oof_probs[perm])
        assert f.oof_probs.shape == (len(rows), 8) and f.test_probs.shape == (2, len(test), 8)
        assert (f.oof_hidden is None) == (member == "tfidf-lr")
        # routed: each test row from the fold model its hash picks; bagged: the mean of both
        routed, bagged = f.test(assigned := assign(test.inputs().keys(), 2, "fold"))[1], f.test(None)[1]
        np.testing.assert_array_equal(routed[assigned == 1], f.test_probs[1][assigned == 1])
        np.testing.assert_allclose(bagged, f.test_probs.mean(0))
    # out-of-fold rows come from the fold model that held them out; every fold model answers every test row
    for fold in range(2):
        d = exp.layout.features("neox-lora", fold)
        assert set(json.loads((d / "oof_ids.json").read_text())) == set(folds["folds"][fold])
        assert json.loads((d / "test_ids.json").read_text()) == test.ids


def test_features_a_train_run_made_equal_those_a_task_computes_from_its_best_checkpoint(stacked, caplog):
    """The features stage takes a final run's own features (made from the model in hand). Without
    them, or when they are of other weights than the best checkpoint's, a task loads that checkpoint
    and computes the same numbers (LoRA, and QLoRA in 4-bit)."""
    from nikl_ray.handoff import MADE, take
    from nikl_ray.stages import features

    exp, data, _ = stacked
    layout = exp.layout
    lora, qlora = ("neox-lora", 0), ("neox-qlora", 1)
    before = {p: read_features(layout.features(*p)) for p in (lora, qlora)}
    for p in (lora, qlora):  # what the stage took for them were the runs' own features
        best = layout.pair(*p) / load_manifest(layout.pair(*p))["best_checkpoint"]
        made = take(layout.run_features(*p), best, before[p]["oof"]["ids"], before[p]["test"]["ids"],
                                        data.test.data_hash())
        np.testing.assert_array_equal(made["test"]["probs"], before[p]["test"]["probs"])
    (layout.run_features(*lora) / MADE).unlink()
    stamp = read_json(layout.run_features(*qlora) / MADE)
    write_json(layout.run_features(*qlora) / MADE, {**stamp, "step": stamp["step"] + 1})  # another epoch's weights
    for member, fold in (lora, qlora, ("neox-lora", 1)):
        (layout.features(member, fold) / "manifest.json").unlink()
    with caplog.at_level("INFO", logger="nikl_ray"):
        features.run(exp, data)
    assert "features neox-lora-fold1: not run yet → taken from its train run" in caplog.text
    for member, fold in (lora, qlora):
        assert f"features {member}-fold{fold}: not run yet → computing" in caplog.text
        after = read_features(layout.features(member, fold))
        for part in ("oof", "test"):
            assert after[part]["ids"] == before[(member, fold)][part]["ids"]
            np.testing.assert_allclose(after[part]["probs"], before[(member, fold)][part]["probs"], atol=1e-5)
            np.testing.assert_allclose(after[part]["hidden"], before[(member, fold)][part]["hidden"], atol=1e-4)


def test_heads_ran_as_parallel_ray_tasks(stacked):
    heads = sorted(read_json(stacked[0].layout.ensemble / "report.json")["heads"], key=lambda h: h["start"])
    assert len(heads) == 2 * 2 * 2  # 2 stacks × 2 hidden sizes × 2 inner folds
    assert sum(1 for a, b in zip(heads, heads[1:]) if b["start"] < a["end"]) >= 1, heads


def test_the_report_scores_every_candidate_with_cross_fitted_rules_and_submits_the_best(stacked):
    exp = stacked[0]
    report = read_json(exp.layout.ensemble / "report.json")
    table, chosen = report["table"], report["chosen"]
    assert {"enc-full", "neox-lora", "neox-qlora", "tfidf-lr", "prob-average", "majority-vote", "stack", "stack+hidden",
            "stack@h16", "stack+hidden@h32"} <= set(table)
    for by_rule in table.values():
        assert set(by_rule) == {"threshold_0.5", "global_threshold", "per_label_thresholds", "at_least_one"}
        assert all(0 <= r["crossfit"] <= 1 and 0 <= r["in_sample"] <= 1 for r in by_rule.values())
    # the submitted candidate is the best by cross-fitted score, whichever kind it is; a stack is not favoured
    scored = {n: max(r["crossfit"] for r in table[n].values()) for n in report["candidates"]}
    assert chosen["name"] == max(scored, key=scored.get) and chosen["score"] == pytest.approx(scored[chosen["name"]])
    assert "prob-average" in report["candidates"] and "stack+hidden" in report["candidates"]
    md = (exp.layout.ensemble / "report.md").read_text()
    assert f"Submitted: {chosen['name']}" in md and "cross-fitted" in md and "in-sample" in md
    assert (exp.layout.ensemble / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # per label: the predicted positive rate out-of-fold and on test, side by side
    assert len(report["per_label"]) == 8 and all(r["test_predicted_rate"] is not None for r in report["per_label"])


def test_a_degenerate_member_is_flagged_and_left_out_of_every_ensemble(stacked):
    exp = stacked[0]
    assert all(load_manifest(exp.layout.pair("enc-full", f))["degenerate"] for f in range(2))
    report = read_json(exp.layout.ensemble / "report.json")
    assert "enc-full" in report["degenerate"] and "enc-full" not in report["active_members"]
    assert "enc-full" not in report["candidates"] and "enc-full" in report["table"]  # scored, never submitted
    assert "DEGENERATE" in (exp.layout.train_summary.with_suffix(".md")).read_text()
    assert "left out (degenerate)" in (exp.layout.ensemble / "report.md").read_text()


def test_every_candidate_writes_its_own_submission_and_the_chosen_one_is_the_submission(stacked):
    exp, data, _ = stacked
    report = read_json(exp.layout.ensemble / "report.json")
    for name, rel in report["submissions"].items():
        sub = read_rows(exp.layout.ensemble / rel, exp.task, labelled=True)
        assert sub.ids == data.test.ids and [r["input"] for r in sub.records] == [r["input"] for r in data.test.records]
    chosen = report["chosen"]["name"]
    assert (exp.layout.ensemble / report["submissions"][chosen]).read_text() == exp.layout.submission(".jsonl").read_text()


def test_the_predictor_answers_exactly_as_the_submission_did(stacked):
    """One procedure for the batch path and a single sentence: the Predictor run on the test rows
    gives the submission's labels; one sentence alone gives its row's answer."""
    from nikl_ray.predictor import Predictor

    exp, data, _ = stacked
    predictor = Predictor.load(exp.results)
    out = predictor.predict(data.test.inputs())
    sub = read_rows(exp.layout.submission(".jsonl"), exp.task, labelled=True)
    np.testing.assert_array_equal(out.decisions, sub.labels.astype(bool))
    report = json.loads(exp.layout.report_json.read_text())
    for candidate, path in report["submissions"].items():  # any candidate answers as its own submission did
        own = read_rows(exp.layout.ensemble / path, exp.task, labelled=True)
        np.testing.assert_array_equal(predictor.predict(data.test.inputs(), candidate=candidate).decisions,
                                      own.labels.astype(bool), err_msg=candidate)
    # the other way of answering rows (ensemble.test_rows: routed or bagged) as its submissions wrote it
    predictor.decision["test_rows"] = {"routed": "bagged", "bagged": "routed"}[report["test_rows"]]
    assert set(report["submissions_other_test_rows"]) == set(report["submissions"])
    for candidate, path in report["submissions_other_test_rows"].items():
        own = read_rows(exp.layout.ensemble / path, exp.task, labelled=True)
        np.testing.assert_array_equal(predictor.predict(data.test.inputs(), candidate=candidate).decisions,
                                      own.labels.astype(bool), err_msg=f"{candidate} {predictor.decision['test_rows']}")
    predictor.decision["test_rows"] = report["test_rows"]
    i = int(np.flatnonzero([t is not None for t in data.test.targets])[0])
    text, target = data.test.texts[i], data.test.targets[i]
    if text.find(target) == data.test.spans[i][0]:  # predict_text takes the first occurrence
        probs, labels = predictor.predict_text(text, target)
        np.testing.assert_allclose(list(probs.values()), out.probs[i], atol=1e-5)
        assert labels == [lab for lab, d in zip(exp.task.labels, out.decisions[i]) if d]


def test_heads_never_look_at_the_labels_of_the_rows_they_answer_for(ray_local):
    """A head trained with the labels outside its training rows scrambled is the same head:
    early stopping uses a slice of its own training rows."""
    from nikl_ray.stacking import HeadJob, train_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = (x[:, :4] > 0.3).astype(np.float32)
    job = HeadJob("stack", 16, 0, np.arange(200), 0, True, 40, 5, 0.2, 0.0, 1e-2, 32)
    scrambled = y.copy()
    scrambled[200:] = 1 - scrambled[200:]
    a, b = train_head(job, x, y), train_head(job, x, scrambled)
    assert a["best_epoch"] == b["best_epoch"]
    for k in a["state"]:
        np.testing.assert_array_equal(a["state"][k], b["state"][k])


def test_stacked_heads_learn_from_raw_features_what_their_member_knows(ray_local):
    """Heads trained through fit_heads (parallel Ray tasks) on one informative member plus loud,
    useless hidden states: both stacks, given raw features, score near the member and far above chance."""
    from nikl_ray.config import EnsembleConfig
    from nikl_ray.decision import score_rules
    from nikl_ray.placement import Placement
    from nikl_ray.stacking import candidate_probs, fit_heads, stack_matrix

    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random((n, 4)) < [0.4, 0.3, 0.2, 0.1]).astype(np.float32)
    probs = 1 / (1 + np.exp(-(2.5 * (2 * y - 1) + rng.normal(0, 1.5, y.shape))))
    hidden = rng.normal(50, 20, (n, 8)).astype(np.float32)  # far from standardised, and no signal
    member = {"m": (hidden, probs)}
    xs = {s: stack_matrix([member["m"]], s == "stack+hidden") for s in ("stack", "stack+hidden")}
    inner = np.arange(n) % 3
    cfg = EnsembleConfig(hidden_sizes=[16, 32], inner_folds=3, epochs=80, patience=10)
    heads, runs = fit_heads(xs, y, inner, cfg, True, Placement("heads", 0.1, 0, 0.0, 1.0))
    assert len(runs) == 2 * 2 * 3
    best = lambda p: max(r["crossfit"] for r in score_rules(p, y, True, inner).values())  # noqa: E731
    alone = best(probs)
    chance = 2 * y.mean() / (1 + 2 * y.mean())  # F1 of predicting every label everywhere
    for stack in xs:
        score = best(candidate_probs(stack, member, ["m"], heads, inner, True))
        assert score > alone - 0.06 and score > chance + 0.4, (stack, score, alone, chance)


def test_the_classical_members_features_are_tied_to_the_rows_each_fold_held_out(stacked):
    """After a change of folds (k, seed or selection) its fold models are fitted again, not reused."""
    from nikl_ray.runspec import held_out_hash

    exp, data, _ = stacked
    folds = data.folds(exp)
    for fold in range(2):
        inputs = load_manifest(exp.layout.features("tfidf-lr", fold))["inputs"]
        assert inputs["held_out_hash"] == held_out_hash(folds, fold)
