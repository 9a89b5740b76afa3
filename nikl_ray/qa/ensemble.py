"""The ensemble stage of a generate task: minimum-Bayes-risk selection over every member's answers.

1. Every member's answers (features stage: each fold model's greedy answer and any samples, the
   retrieval member's) are loaded per question, out-of-fold and test. Members with a degenerate
   fold model (the same answer to nearly every question) are left out of every combination.
2. Candidates, each scored out-of-fold by the task's metric against the item's references:
   - each member alone (its greedy answer);
   - `mbr`: per question, the answer among all active members' candidates with the highest mean
     utility (the task's metric) against the other candidates: the consensus answer;
   - `mbr-top`: MBR over the m best members only (m = 1: over the best member's own candidates,
     e.g. the retrieval member's references of the nearest items), m and the ranking
     *cross-fitted*: chosen on the other inner folds (by item), applied to each inner fold in turn.
3. What is submitted is the candidate with the best out-of-fold score. Its test answers come from
   the same procedure (mbr-top: m and the ranking chosen on every out-of-fold question).
4. The report gives every candidate's score overall and per group, and example answers; every
   candidate's test answers are written under `submissions/`; the run's record (`run.json`) and
   the training items retrieval needs (`qa_items.json`) are what the QA Predictor reads.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from nikl_ray.artifacts import manifest_problem, sha256_file, write_json, write_manifest, write_text
from nikl_ray.members import RETRIEVAL, member_names
from nikl_ray.qa.answers import read_answers
from nikl_ray.runspec import assign
from nikl_ray.tables import markdown

log = logging.getLogger(__name__)
MBR, MBR_TOP = "mbr", "mbr-top"
EXAMPLES = 5
MAX_GROUPS = 12  # the report's per-group columns: the most frequent groups


class Judge:
    """The task's metric and MBR utility, with every text embedded once (cosine)."""

    def __init__(self, task):
        from nikl_ray.qa.metrics import get_embedder

        self.metric = task.metric
        self.embedder = _Cached(get_embedder(task.embedder)) if task.metric == "cosine" else None

    def prefetch(self, texts) -> None:
        if self.embedder is not None:
            self.embedder.encode(sorted(set(texts)))

    def scores(self, predictions: list[str], references: list[list[str]]) -> np.ndarray:
        from nikl_ray.qa.metrics import score_answers

        return score_answers(self.metric, predictions, references, self.embedder)


class _Cached:
    """An embedder that embeds each distinct text once."""

    def __init__(self, embedder):
        self.embedder, self.name, self._vec = embedder, getattr(embedder, "name", "embedder"), {}

    def encode(self, texts):
        new = sorted({t for t in texts if t not in self._vec})
        if new:
            self._vec.update(zip(new, self.embedder.encode(new)))
        return np.stack([self._vec[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)


def load_answers(layout, member: str, k: int, oof_ids: list[str], test_ids: list[str]) -> dict:
    """{part: per question [(text, logp), …]} in the order asked, joined by question id."""
    got = {"oof": {}, "test": {}}
    for fold in range(k):
        parts = read_answers(layout.features(member, fold))
        for part in got:
            got[part].update(zip(parts[part]["ids"], parts[part]["answers"]))
    out = {}
    for part, want in (("oof", oof_ids), ("test", test_ids)):
        missing = [q for q in want if q not in got[part]]
        if missing:
            raise ValueError(f"answers of {member}: {len(missing)} {part} question(s) have none, e.g. {missing[:3]}")
        out[part] = [[(a[0], a[1]) for a in got[part][q]] for q in want]
    return out


def pools(answers: dict, members: list[str], part: str, n: int) -> list[list[tuple[str, str]]]:
    """Per question: every (member, answer) candidate of `members`."""
    return [[(m, a[0]) for m in members for a in answers[m][part][i]] for i in range(n)]


def mbr_answers(judge: Judge, pool: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Per question, the (member, answer) MBR picks from its pool."""
    from nikl_ray.qa.metrics import mbr_choose

    picks = mbr_choose(judge.metric, [[a for _, a in p] for p in pool], embedder=judge.embedder)
    return [p[i] for p, i in zip(pool, picks)]


class TopMembers:
    """MBR over sets of members, each set's answers and scores computed once; mbr-top: over the m
    best members, the ranking (each member alone) and m chosen on some out-of-fold questions."""

    def __init__(self, judge: Judge, answers: dict, alone: dict[str, np.ndarray], refs: list[list[str]]):
        """`alone`: each active member's per-question out-of-fold scores."""
        self.judge, self.answers, self.alone, self.refs = judge, answers, alone, refs
        self.active = list(alone)
        self._mbr: dict = {}

    def mbr(self, members: list[str]) -> tuple[list[tuple[str, str]], np.ndarray]:
        key = tuple(sorted(members))
        if key not in self._mbr:
            picked = mbr_answers(self.judge, pools(self.answers, list(key), "oof", len(self.refs)))
            self._mbr[key] = (picked, self.judge.scores([a for _, a in picked], self.refs))
        return self._mbr[key]

    def best(self, rows: np.ndarray) -> list[str]:
        """The members chosen on the out-of-fold questions at `rows`."""
        ranking = sorted(self.active, key=lambda m: -self.alone[m][rows].mean())
        return max((ranking[:m] for m in range(1, len(ranking) + 1)), key=lambda ms: self.mbr(ms)[1][rows].mean())

    def crossfit(self, inner: np.ndarray, n_inner: int) -> tuple[list[tuple[str, str]], dict]:
        """Each inner fold answered by the members chosen on the others; what each fold chose."""
        chosen: list = [None] * len(self.refs)
        record = {}
        for j in range(n_inner):
            members = self.best(np.flatnonzero(inner != j))
            picked = self.mbr(members)[0]
            for i in np.flatnonzero(inner == j):
                chosen[i] = picked[i]
            record[j] = members
        return chosen, record


def run(exp, data) -> Path:
    """Compare every candidate out-of-fold, write report, submissions and the run's record. Returns the report."""
    from nikl_ray.members import active_members
    from nikl_ray.qa.data import queries, test_queries, write_answers, write_vectors

    layout, folds, rows, test, task = exp.layout, data.folds(exp), data.rows, data.test, exp.task
    k, cfg = folds["k"], exp.ensemble
    members = member_names(exp)
    inputs = {"features": {f"{m}/fold{f}": sha256_file(layout.manifest(layout.features(m, f))) for m in members for f in range(k)},
              "inner_folds": cfg.inner_folds, "seed": cfg.seed, "task": task.model_dump(mode="json")}
    if manifest_problem(layout.ensemble, inputs, __name__) is None:
        log.info("ensemble: done already (%s)", layout.ensemble)
        return layout.report
    oof_q = queries(rows.ids, rows.questions, rows.contexts)
    test_q = test_queries(test.ids, test.questions, test.contexts) if test is not None else []
    answers = {m: load_answers(layout, m, k, [q.id for q in oof_q], [q.id for q in test_q]) for m in members}
    active, dead = active_members(exp, k)
    refs = [rows.answers[q.item] for q in oof_q]
    groups = [rows.groups[q.item] for q in oof_q]
    inner = assign([rows.ids[q.item] for q in oof_q], cfg.inner_folds, "inner")  # by item: its phrasings together
    judge = Judge(task)
    judge.prefetch([r for rs in refs for r in rs] + [a[0] for m in members for part in answers[m].values()
                                                      for q in part for a in q])
    log.info("ensemble: %d out-of-fold questions, %d test questions, members %s", len(oof_q), len(test_q), members)

    oof = {m: [(m, a[0][0]) for a in answers[m]["oof"]] for m in members}  # each member alone: its greedy answer
    per_question = {m: judge.scores([a for _, a in got], refs) for m, got in oof.items()}
    combos = {}
    top = TopMembers(judge, answers, {m: per_question[m] for m in active}, refs)  # every member set's MBR, once
    if sum(len(answers[m]["oof"][0]) for m in active) > 1:
        (oof[MBR], per_question[MBR]), combos[MBR] = top.mbr(active), active
    if len(active) > 1:
        oof[MBR_TOP], per_fold = top.crossfit(inner, cfg.inner_folds)
        per_question[MBR_TOP] = judge.scores([a for _, a in oof[MBR_TOP]], refs)
        combos[MBR_TOP] = top.best(np.arange(len(refs)))  # for the test questions: chosen on all of them
    score = {n: float(s.mean()) for n, s in per_question.items()}
    candidates = active + list(combos)
    chosen = max(candidates, key=lambda n: score[n])
    member_best = max(active, key=lambda m: score[m])
    runner_up = max((n for n in candidates if n != chosen), key=lambda n: score[n], default=None)

    files, suffix = [], task.suffix
    test_answers = {}
    if test is not None:
        for n in candidates:
            picked = (mbr_answers(judge, pools(answers, combos[n], "test", len(test_q))) if n in combos
                      else [(n, a[0][0]) for a in answers[n]["test"]])
            test_answers[n] = [a for _, a in picked]
            files.append(write_answers(test, test_answers[n], layout.candidate_submission(n, suffix)))
        files.append(write_answers(test, test_answers[chosen], layout.answers_submission(suffix)))
        if task.submission_vectors:
            vectors = judge.embedder.encode(test_answers[chosen]) if judge.embedder else _vectors(task, test_answers[chosen])
            files.append(write_vectors(test, vectors, layout.submission(suffix)))
        else:
            files.append(write_answers(test, test_answers[chosen], layout.submission(suffix)))
        log.info("ensemble: submission (%s) written to %s", chosen, layout.submission(suffix))

    by_group = sorted(g for g, _ in Counter(g for g in groups if g is not None).most_common(MAX_GROUPS))
    table = [{"candidate": n, f"out-of-fold {task.metric}": score[n],
              **{g: float(per_question[n][[i for i, x in enumerate(groups) if x == g]].mean()) for g in by_group},
              "role": "submitted" if n == chosen else "candidate" if n in candidates else "left out (degenerate)"}
             for n in oof]
    examples = [{"question": oof_q[i].question, "reference": refs[i][0],
                 **{n: oof[n][i][1] for n in oof}} for i in range(min(EXAMPLES, len(oof_q)))]
    report = {
        "metric": task.metric, "rows": len(rows), "questions": len(oof_q), "members": members, "active_members": active,
        "degenerate": dead, "candidates": candidates, "oof_score": score, "table": table, "examples": examples,
        "combinations": combos, "mbr_top_per_inner_fold": per_fold if MBR_TOP in oof else None,
        "chosen": {"name": chosen, "rule": "mbr" if chosen in combos else "member", "params": {"members": combos.get(chosen, [chosen])},
                   "score": score[chosen], "runner_up": runner_up, "runner_up_score": score.get(runner_up),
                   "best_member": member_best, "best_member_score": score[member_best],
                   "retrieval_score": score.get(RETRIEVAL)},
    }
    from nikl_ray.stages.ensemble import bar_plot, track

    files += [write_json(layout.report_json, report), write_text(layout.report, report_markdown(report)),
              bar_plot(score, chosen, candidates, combos, f"Out-of-fold {task.metric}; green: submitted", layout.report_plot)]
    files += write_record(exp, rows, chosen, combos, candidates, table, k, cfg.inner_folds)
    write_manifest(layout.ensemble, inputs=inputs, files=files, code=__name__)
    track(exp, report, table)
    log.info("ensemble: submitted %s, out-of-fold %s %.4f (best member %s %.4f%s)", chosen, task.metric, score[chosen],
             member_best, score[member_best],
             f", retrieval {score[RETRIEVAL]:.4f}" if RETRIEVAL in score else "")
    return layout.report


def _vectors(task, answers):
    from nikl_ray.qa.metrics import get_embedder

    return get_embedder(task.embedder).encode(answers)


def write_record(exp, rows, chosen: str, combos: dict, candidates: list[str], table: list[dict], k: int,
                 inner_folds: int) -> list[Path]:
    """The run as trained, for the QA Predictor: the task, the backbones, each candidate's members,
    and the training items the retrieval member and retrieval prompts read."""
    from nikl_ray.stages.ensemble import record_backbone

    layout = exp.layout
    decision = {"candidate": chosen, "k": k, "inner_folds": inner_folds, "members": member_names(exp),
                "combinations": combos, "retrieval_items": exp.retrieval_items}
    return [write_json(layout.record, {
                "task": exp.task.model_dump(mode="json"), "backbones": [record_backbone(exp, b) for b in exp.backbones],
                "decision": decision, "rules": {n: {"rule": "mbr" if n in combos else "member", "members": combos.get(n, [n])}
                                                for n in candidates},
                "leaderboard": {"columns": list(table[0]), "rows": [list(r.values()) for r in table]}}),
            write_json(layout.qa_items, {"ids": rows.ids, "questions": rows.questions, "contexts": rows.contexts,
                                         "answers": rows.answers})]


def report_markdown(report: dict) -> str:
    c, metric = report["chosen"], report["metric"]
    lines = [f"# Ensemble report (generate)\n\n{report['rows']} items, {report['questions']} out-of-fold questions "
             f"(every phrasing); members: {', '.join(report['members'])}.\n",
             f"Every score is out-of-fold {metric}: each question answered by the fold models that never saw its item. "
             "`mbr` picks, per question, the candidate with the highest mean utility against the others; `mbr-top` "
             "does so over the m best members, m and the ranking chosen on the other inner folds (cross-fitted). "
             "The submitted candidate is the best of these on the same questions: its margin over the next is "
             "optimistic by the choice.\n",
             markdown(report["table"]),
             f"**Submitted: {c['name']}**: out-of-fold {metric} {c['score']:.4f}"
             + (f", {c['score'] - c['runner_up_score']:+.4f} over the next candidate ({c['runner_up']})" if c["runner_up"] else "")
             + f", {c['score'] - c['best_member_score']:+.4f} over the best single member ({c['best_member']})"
             + (f", {c['score'] - c['retrieval_score']:+.4f} over the retrieval member" if c["retrieval_score"] is not None else "")
             + ".\n"]
    if report["degenerate"]:
        lines.append("Left out (degenerate fold models): " + "; ".join(f"{m}: {', '.join(r)}" for m, r in report["degenerate"].items()) + "\n")
    lines += ["## Example answers (out-of-fold)\n", markdown(report["examples"])]
    return "\n".join(lines)
