"""The ensemble stage: stack the members, compare every candidate honestly, submit the best.

1. Each member's out-of-fold and test features (features stage) are loaded by row id. Members
   with a degenerate fold model (train table) are left out of every ensemble, and say so.
2. Heads (stacking.py) train with an inner K-fold, one named Ray task per
   (stack × hidden size × inner fold), all at once; each stops early on a slice of its own rows.
3. Every candidate — each member, probability averaging, majority voting, both stacks — and
   each hidden size is scored with each decision rule *cross-fitted* over the inner folds
   (decision.py). The submitted candidate and its rule are the best by those scores only.
4. Test rows go through exactly that procedure (`stacking.candidate_probs`, the same function
   that gave the out-of-fold probabilities), routed to one fold model and inner fold as an
   out-of-fold row is, or bagged over all of them (`ensemble.test_rows`); the submission is
   written in the task's format, and so is every candidate's own prediction, under
   `submissions/` (and the other way of answering test rows under `submissions/<way>/`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from nikl_ray.artifacts import atomic_path, manifest_problem, sha256_file, write_json, write_manifest, write_text
from nikl_ray.config import Experiment
from nikl_ray.data import write_predictions
from nikl_ray.decision import best_rule, crossfit, decide, score_rules
from nikl_ray.inputs import Inputs
from nikl_ray.folds import stratified_folds
from nikl_ray.members import active_members, load_member, member_names
from nikl_ray.metrics import metric_name, per_label_table, scores
from nikl_ray.runspec import assign
from nikl_ray.placement import place
from nikl_ray.stacking import SIMPLE, STACKS, candidate_probs, fit_heads, stack_matrix
from nikl_ray.tables import markdown

log = logging.getLogger(__name__)

# what the report says of test rows, by `ensemble.test_rows`
TEST_ROWS = {
    "routed": "each answered by one fold model and one inner fold of heads (a stable hash of the row), as each "
              "out-of-fold row is: the out-of-fold score estimates the test score",
    "bagged": "each answered by every fold model and every inner fold of heads, averaged (bagging); out-of-fold rows "
              "are answered by one fold model each, so the out-of-fold score is a lower bound rather than an estimate",
}


def run(exp: Experiment, data: Inputs) -> Path:
    """Train the heads, compare the candidates, write report, plot and submissions. Returns the report path."""
    if exp.task.generates:
        from nikl_ray.qa import ensemble

        return ensemble.run(exp, data)
    from nikl_ray.cluster import plan_stage

    layout, folds, rows, test = exp.layout, data.folds(exp), data.rows, data.test
    k, cfg, task, y = folds["k"], exp.ensemble, exp.task, rows.labels
    members = member_names(exp)
    inputs = {"features": {f"{m}/fold{f}": sha256_file(layout.manifest(layout.features(m, f)))
                           for m in members for f in range(k)},
              "ensemble": cfg.model_dump(), "task": task.model_dump(mode="json")}
    if manifest_problem(layout.ensemble, inputs, __name__) is None:
        log.info("ensemble: done already (%s)", layout.ensemble)
        return layout.report
    loaded = {m: load_member(layout, m, k, rows.ids, test.ids if test is not None else None) for m in members}
    active, dead = active_members(exp, k)

    inner = np.zeros(len(rows), dtype=int)
    for j, held in enumerate(stratified_folds(y, task.multi_label, cfg.inner_folds, cfg.seed)):
        inner[held] = j
    oof = {m: (f.oof_hidden, f.oof_probs) for m, f in loaded.items()}
    stacks = [s for s, hidden in STACKS.items() if not hidden or any(oof[m][0] is not None for m in active)]
    xs = {s: stack_matrix([oof[m] for m in active], STACKS[s]) for s in stacks}
    stage = plan_stage(exp, exp.backbones)
    biggest = max(x.nbytes for x in xs.values())
    placement = place("heads", 3 * biggest + 64 * 2**20, budget_gb=stage.budget_gb, physical_gb=stage.shape.physical_gb,
                      use_gpu=stage.device.schedule_gpu, cpus=1, max_trials_per_card=exp.resources.max_trials_per_card)
    heads, head_runs = fit_heads(xs, y, inner, cfg, task.multi_label, placement, stage.device.device)

    # Every row of the comparison, scored with cross-fitted rules; candidates are what may be submitted.
    candidates = active + (list(SIMPLE) if len(active) > 1 else []) + stacks
    names = members + [n for n in candidates if n not in members] + [f"{s}@h{h}" for s in stacks for h in cfg.hidden_sizes]
    oof_probs = {n: candidate_probs(n, oof, active, heads, inner, task.multi_label) for n in names}
    table = {n: score_rules(oof_probs[n], y, task.multi_label, inner) for n in names}
    best = {n: best_rule(table[n]) for n in names}
    score = {n: table[n][best[n]]["crossfit"] for n in names}
    chosen = max(candidates, key=lambda n: score[n])
    rule, params = best[chosen], table[chosen][best[chosen]]["params"]
    oof_decisions = crossfit(oof_probs[chosen], y, rule, inner)

    files = save_oof(layout.ensemble_oof, rows.ids, inner, oof_probs)
    test_rates = None
    suffix = task.suffix
    submissions = {}
    other_rows = {}  # each candidate's test answers the other way (`test_rows`), to compare on labelled test rows
    if test is not None:
        def answers(how: str) -> dict[str, np.ndarray]:
            """Each candidate's test decisions, its rows answered `how` (routed or bagged)."""
            keys = test.inputs().keys()
            fold_of, inner_of = ((assign(keys, k, "fold"), assign(keys, cfg.inner_folds, "inner")) if how == "routed"
                                 else (None, None))
            feats = {m: f.test(fold_of) for m, f in loaded.items()}
            return {n: decide(candidate_probs(n, feats, active, heads, inner_of, task.multi_label), best[n],
                              table[n][best[n]]["params"]) for n in candidates}

        other = next(how for how in TEST_ROWS if how != cfg.test_rows)
        other_rows = {n: write_predictions(test, d, layout.candidate_submission(n, suffix, other))
                      for n, d in answers(other).items()}
        submitted = answers(cfg.test_rows)
        submissions = {n: write_predictions(test, d, layout.candidate_submission(n, suffix)) for n, d in submitted.items()}
        test_rates = submitted[chosen].mean(0)
        files += [*submissions.values(), *other_rows.values(), write_predictions(test, submitted[chosen],
                                                                                 layout.submission(suffix))]
        log.info("ensemble: submission (%s, test rows %s) written to %s", chosen, cfg.test_rows, layout.submission(suffix))

    metric = metric_name(task.multi_label)
    member_best = max((m for m in active), key=lambda m: score[m])
    runner_up = max((n for n in candidates if n != chosen), key=lambda n: score[n], default=None)
    report = {
        "metric": metric, "rows": len(rows), "members": members, "active_members": active,
        "degenerate": dead, "features": {s: int(x.shape[1]) for s, x in xs.items()},
        "table": table, "best_rule": best, "crossfit_score": score, "candidates": candidates,
        "chosen": {"name": chosen, "rule": rule, "params": params, "score": score[chosen],
                   "runner_up": runner_up, "runner_up_score": score.get(runner_up),
                   "best_member": member_best, "best_member_score": score[member_best]},
        "chosen_oof_scores": scores(y, oof_decisions, task.labels, task.multi_label),
        "per_label": [{**r, "true_rate": float(t), "oof_predicted_rate": float(o),
                       "test_predicted_rate": None if test_rates is None else float(tr)}
                      for r, t, o, tr in zip(per_label_table(y, oof_decisions, task.labels), y.mean(0),
                                             oof_decisions.mean(0), test_rates if test_rates is not None else y.mean(0))],
        "selection": {"fold_models": f"epoch chosen on a {exp.folds.selection:.0%} slice of each fold's training rows"
                      if exp.folds.selection else "no early stopping: the last epoch of each fold model",
                      "heads": f"early stopping on a {cfg.early_stopping:.0%} slice of each head's training rows (its loss)"
                      if cfg.early_stopping else f"{cfg.epochs} epochs, no early stopping",
                      "rules": f"fitted on {cfg.inner_folds - 1} inner folds, applied to the remaining one, in turn",
                      "test_rows": TEST_ROWS[cfg.test_rows]},
        "heads": head_runs,
        "test_rows": cfg.test_rows,
        "submissions": {n: str(p.relative_to(layout.ensemble)) for n, p in submissions.items()},
        "submissions_other_test_rows": {n: str(p.relative_to(layout.ensemble)) for n, p in other_rows.items()},
    }
    for stack, h in heads.items():
        files += h.save(layout.heads)
    files.append(write_json(layout.report_json, report))
    files.append(write_text(layout.report, report_markdown(report)))
    files.append(plot_report(report, layout.report_plot))
    decision = {"candidate": chosen, "rule": rule, "params": params, "members": members, "active": active,
                "stacks": stacks, "hidden_sizes": cfg.hidden_sizes, "inner_folds": cfg.inner_folds, "k": k,
                "test_rows": cfg.test_rows}
    files.append(write_json(layout.decision, decision))
    files += write_record(exp, rows, decision, {n: {"rule": best[n], "params": table[n][best[n]]["params"]} for n in names},
                          candidates_table(report))
    write_manifest(layout.ensemble, inputs=inputs, files=files, code=__name__)
    track(exp, report, candidates_table(report))
    log.info("ensemble candidates (cross-fitted out-of-fold %s per rule):\n%s\n%s", report["metric"],
             markdown(candidates_table(report)), submitted_line(report))
    return layout.report


def save_oof(d: Path, ids: list[str], inner: np.ndarray, probs: dict[str, np.ndarray]) -> list[Path]:
    from nikl_ray.artifacts import save_npy

    return [write_json(d / "rows.json", {"ids": ids, "inner": inner.tolist()})] + [
        save_npy(d / f"{name}.npy", p) for name, p in probs.items()]


def read_oof(d: Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(row ids, inner folds, {candidate: out-of-fold probabilities}) that save_oof wrote."""
    from nikl_ray.artifacts import read_json

    rows = read_json(d / "rows.json")
    return rows["ids"], np.asarray(rows["inner"]), {p.stem: np.load(p, allow_pickle=False) for p in sorted(d.glob("*.npy"))}


def write_record(exp: Experiment, rows, decision: dict, rules: dict, leaderboard: list[dict]) -> list[Path]:
    """The run as trained, for Predictor.load: it needs no experiment file and no training data, only
    this folder (and the base checkpoints adapters sit on). Checkpoints inside the results root are
    kept relative to it, so a copied results folder answers from its own files."""
    from collections import Counter

    counts = Counter(w for t in rows.texts for w in t.split())
    return [write_json(exp.layout.record, {
                "task": exp.task.model_dump(mode="json"), "backbones": [record_backbone(exp, b) for b in exp.backbones],
                "decision": decision, "rules": rules,
                # columns kept in order (the record's keys are sorted when written)
                "leaderboard": {"columns": list(leaderboard[0]), "rows": [list(r.values()) for r in leaderboard]}}),
            write_json(exp.layout.repeated_words, sorted(w for w, c in counts.items() if c > 1))]


def record_backbone(exp: Experiment, spec) -> dict:
    """A backbone as the run's record keeps it: a checkpoint inside the results root relative to it."""
    d = spec.model_dump(mode="json")
    path = Path(spec.checkpoint)
    if path.is_absolute() and path.is_relative_to(exp.layout.root):
        d["checkpoint"] = path.relative_to(exp.layout.root).as_posix()
        d["checkpoint_in_results"] = True
    return d


def track(exp: Experiment, report: dict, table: list[dict]) -> None:
    """The stage as one tracked run (a new one each time it runs): its settings, every candidate's
    cross-fitted scores, the submitted choice."""
    import shutil

    from nikl_ray.tracking import Tracker, target

    shutil.rmtree(exp.layout.ensemble_run, ignore_errors=True)
    params = {"metric": report["metric"], "members": report["members"], "active_members": report["active_members"],
              "degenerate": sorted(report["degenerate"]), "ensemble": exp.ensemble.model_dump(mode="json")}
    with Tracker.open(target(exp, "ensemble"), "ensemble", exp.layout.ensemble_run, params) as tracker:
        tracker.table("candidates", table)
        tracker.summary({"submitted": report["chosen"]}, 0)


# ---------------------------------------------------------------------------- report
def candidates_table(report: dict) -> list[dict]:
    """Every candidate's cross-fitted score under each rule, its in-sample score and its role: the
    report's table, and what Predictor.leaderboard() returns."""
    c, rules = report["chosen"], list(next(iter(report["table"].values())))
    rows = []
    for name, by_rule in report["table"].items():
        role = ("submitted" if name == c["name"] else "candidate" if name in report["candidates"]
                else "left out (degenerate)" if name in report["degenerate"] else "")
        rows.append({"ensemble": name, **{r: by_rule[r]["crossfit"] for r in rules},
                     "in-sample, its best rule": by_rule[report["best_rule"][name]]["in_sample"], "role": role})
    return rows


def submitted_line(report: dict) -> str:
    metric, c = report["metric"], report["chosen"]
    return (f"**Submitted: {c['name']}**, rule `{c['rule']}` {c['params'] or ''}: cross-fitted {metric} "
            f"{c['score']:.4f}" + (f", {c['score'] - c['runner_up_score']:+.4f} over the next candidate ({c['runner_up']})"
                                   if c["runner_up"] else "")
            + f", {c['score'] - c['best_member_score']:+.4f} over the best single member ({c['best_member']}).")


def report_markdown(report: dict) -> str:
    metric = report["metric"]
    lines = [f"# Ensemble report\n\n{report['rows']} labelled rows; members: {', '.join(report['members'])}; "
             f"stacked features: {', '.join(f'{s} {n}' for s, n in report['features'].items())}.\n",
             f"Every score is out-of-fold {metric} with the decision rule **cross-fitted** over the inner folds "
             "(fitted on the others, applied to each in turn). The in-sample column fits and scores the rule on the "
             "same rows: optimistic, for reference only.\n",
             markdown(candidates_table(report)), submitted_line(report) + "\n"]
    if report["degenerate"]:
        lines.append("Left out of every ensemble (degenerate fold models): " + "; ".join(
            f"{m}: {', '.join(r)}" for m, r in report["degenerate"].items()) + "\n")
    lines += ["## Selection\n"] + [f"- {k.replace('_', ' ')}: {v}" for k, v in report["selection"].items()] + [""]
    lines += ["## Per label (submitted candidate)\n", markdown(
        [{"label": r["label"], "precision": r["precision"], "recall": r["recall"], "F1": r["f1"], "support": r["support"],
          "true rate": r["true_rate"], "predicted rate (out-of-fold)": r["oof_predicted_rate"],
          "predicted rate (test)": r["test_predicted_rate"]} for r in report["per_label"]])]
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> Path:
    names = list(report["table"])
    return bar_plot({n: report["crossfit_score"][n] for n in names}, report["chosen"]["name"], report["candidates"],
                    set(SIMPLE) | set(STACKS), f"Out-of-fold {report['metric']} (cross-fitted rule); green: submitted", path)


def bar_plot(scores: dict[str, float], chosen: str, candidates: list[str], combined, title: str, path: Path) -> Path:
    """Every row's score as a bar: green the submitted one, orange combinations, blue members, grey the left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, vals = list(scores), list(scores.values())
    colors = ["tab:green" if n == chosen else "tab:gray" if n not in candidates else
              "tab:orange" if n in combined else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    ax.barh(names, vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3f}", va="center")
    ax.invert_yaxis()
    ax.set(title=title, xlim=(0, min(1.0, max(vals) * 1.2)))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
