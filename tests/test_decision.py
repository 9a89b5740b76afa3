"""Decision rules and their honest scores (no Ray: numpy and scikit-learn only)."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from nikl_ray.decision import GRID, crossfit, decide, fit_rule, score_rules, selection_score
from nikl_ray.metrics import micro_f1, primary_score


def _data(n=400, L=8, seed=0, signal=0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, L)) < np.linspace(0.03, 0.4, L)).astype(np.float32)
    p = np.clip(signal * y + rng.random((n, L)) * (1 - signal), 0, 1)
    return p, y


def test_micro_f1_is_scikit_learns():
    p, y = _data()
    pred = p > 0.5
    assert micro_f1(y, pred) == pytest.approx(f1_score(y.astype(int), pred.astype(int), average="micro"))


@pytest.mark.parametrize("rule", ["global_threshold", "at_least_one"])
def test_fitted_thresholds_are_the_best_of_the_grid(rule):
    p, y = _data()
    best = max(GRID, key=lambda t: micro_f1(y, decide(p, rule, {"threshold": t})))
    assert fit_rule(p, y, rule)["threshold"] == pytest.approx(best)


def test_per_label_thresholds_match_coordinate_ascent_by_brute_force():
    p, y = _data(seed=1)
    t = np.full(y.shape[1], fit_rule(p, y, "global_threshold")["threshold"])
    for _ in range(2):
        for j in range(len(t)):
            def score(v, j=j):
                trial = t.copy()
                trial[j] = v
                return micro_f1(y, p >= trial)
            t[j] = max(GRID, key=score)
    assert fit_rule(p, y, "per_label_thresholds")["thresholds"] == pytest.approx(list(t))


def test_at_least_one_gives_every_row_a_label():
    p, y = _data()
    out = decide(p, "at_least_one", {"threshold": 0.99})
    assert out.any(1).all() and (out.sum(1) == 1).all()


def _best_constant(y):
    """The best micro-F1 of predicting a fixed label set for every row (what noise is worth)."""
    L = y.shape[1]
    best = 0.0
    for mask in range(1, 1 << L):
        pred = np.zeros(y.shape, dtype=bool)
        pred[:, [j for j in range(L) if mask >> j & 1]] = True
        best = max(best, micro_f1(y, pred))
    return best


def test_cross_fitted_scores_are_not_fooled_by_noise():
    """Probabilities that know nothing of the labels, on 150 rows: fitted and scored on the same
    rows, per-label thresholds look better than they are; cross-fitted, they are worth no more
    than a constant label set."""
    gaps = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        y = (rng.random((150, 8)) < np.linspace(0.05, 0.3, 8)).astype(np.float32)
        s = score_rules(rng.random((150, 8)), y, True, np.arange(150) % 5)["per_label_thresholds"]
        assert s["crossfit"] <= _best_constant(y) + 0.01, seed
        gaps.append(s["in_sample"] - s["crossfit"])
    assert np.mean(gaps) > 0.02, gaps


def test_crossfit_decides_each_group_with_parameters_fitted_without_it():
    p, y = _data(n=200)
    groups = np.arange(200) % 4
    out = crossfit(p, y, "global_threshold", groups)
    for g in range(4):
        held = groups == g
        t = fit_rule(p[~held], y[~held], "global_threshold")["threshold"]
        np.testing.assert_array_equal(out[held], p[held] >= t)


def test_single_label_rules_are_argmax_and_scored_as_accuracy():
    rng = np.random.default_rng(0)
    y = np.eye(2)[rng.integers(0, 2, 100)]
    p = rng.random((100, 2))
    s = score_rules(p, y, False, np.arange(100) % 3)
    assert set(s) == {"argmax"} and s["argmax"]["crossfit"] == pytest.approx((y.argmax(1) == p.argmax(1)).mean())
    assert selection_score(p, y, False) == pytest.approx(primary_score(y, decide(p, "argmax"), False))


def test_the_selection_score_sees_a_model_whose_probabilities_never_reach_one_half():
    p, y = _data(signal=0.6)
    weak = p * 0.4  # the same ranking, every probability below 0.5
    assert micro_f1(y, weak >= 0.5) == 0 and selection_score(weak, y, True) > 0.4
