"""The stages in order, each skipped when its manifest is complete: one entry for CLI and ray jobs.

    split → (tune) → train → features → ensemble → submit
"""

from __future__ import annotations

import time
from pathlib import Path

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


def run_pipeline(exp: Experiment, *, tune: bool = False) -> dict:
    """Every stage in order; returns where things are and how long each stage took."""
    from nikl_ray.ensemble import ensemble_stage, submission_name
    from nikl_ray.features import features_stage
    from nikl_ray.folds import split_stage
    from nikl_ray.train import train_stage

    times: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        out = fn(*args, **kw)
        times[name] = time.time() - t0
        return out

    rows, test = timed("load", load_inputs, exp)
    folds = timed("split", split_stage, exp, rows)
    if tune:
        from nikl_ray.tune import tune_stage

        for spec in exp.backbones:
            if spec.name in exp.search_spaces:
                timed(f"tune {spec.name}", tune_stage, exp, rows, folds, spec.name)
        from nikl_ray.config import reload_experiment

        exp = reload_experiment(exp)  # the tuned best configs apply from here on
    summary = timed("train", train_stage, exp, rows, folds)
    timed("features", features_stage, exp, rows, folds, test)
    report = timed("ensemble", ensemble_stage, exp, rows, folds, test)
    out = {"results": exp.results, "train_summary": summary, "report": report, "plot": report.with_suffix(".png"),
           "submission": (report.parent / submission_name(exp)) if test is not None else None, "stage_seconds": times}
    print_summary(out)
    return out


def print_summary(out: dict) -> None:
    import json

    report = json.loads(Path(out["report"]).with_suffix(".json").read_text())
    best_member = max((m for m in report["members"]), key=lambda m: max(v["micro_f1"] for v in report["table"][m].values()))
    best_member_f1 = max(v["micro_f1"] for v in report["table"][best_member].values())
    lines = ["", "=== summary ===",
             "stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in out["stage_seconds"].items()),
             f"best member: {best_member} (out-of-fold micro-F1 {best_member_f1:.4f})",
             f"prob-average: {max(v['micro_f1'] for v in report['table']['prob-average'].values()):.4f}",
             f"stacked ensemble: {report['stack_oof_scores']['micro_f1']:.4f} (rule {report['chosen_rule']})",
             f"report: {out['report']}", f"plot: {out['plot']}", f"train summary: {out['train_summary']}"]
    if out["submission"]:
        lines.append(f"submission: {out['submission']}")
    print("\n".join(lines), flush=True)
