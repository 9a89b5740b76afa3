"""The classical members against each other, cross-fitted on the real data, 2 CPU cores, no Ray.

    python benchmarks/classical_members.py                 # NIKL train+dev and the NSMC-like set's first 30,000 rows
    python benchmarks/classical_members.py --folds 3 --nsmc-rows 10000

Each member (nikl_ray/members.py: `tfidf-lr`, `tfidf-wc-lr`, `nbsvm`, `use-lr`) is fitted on every fold's
training part and predicts the fold's held-out rows, with the project's own fold maker and
code, so every row gets an out-of-fold probability; its score is the cross-fitted one the
ensemble reports (each decision rule fitted on the other folds, the best rule's score), beside
the average of all of them. Seconds are the member's fitting and predicting over all folds,
also as a ratio to `tfidf-lr`'s in the same run (`use-lr`'s include embedding every row once).

Writes `classical_members.json` / `.md` under `--results`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nikl_ray.data import read_rows  # noqa: E402
from nikl_ray.decision import best_rule, score_rules  # noqa: E402
from nikl_ray.folds import stratified_folds  # noqa: E402
from nikl_ray.members import CLASSICAL, SentenceVectors, classical_probs, fit_classical  # noqa: E402
from nikl_ray.tables import markdown, write_result  # noqa: E402
from nikl_ray.tasks import get_task  # noqa: E402


def cross_fitted(rows, labels: np.ndarray, multi_label: bool, k: int) -> tuple[dict, dict, np.ndarray]:
    """({member: out-of-fold probs}, {member: seconds}, each row's fold)."""
    fold_of = np.zeros(len(labels), int)
    for f, held in enumerate(stratified_folds(labels, multi_label, k, 42)):
        fold_of[held] = f
    probs, seconds, vectors = {}, {}, SentenceVectors(threads=2)  # every row embedded once, as the features stage does
    for name in CLASSICAL:
        t0, out = time.time(), np.zeros(labels.shape, np.float32)
        for f in range(k):
            held, train = np.flatnonzero(fold_of == f), np.flatnonzero(fold_of != f)
            model = fit_classical(rows.take(train), labels[train], multi_label, name, vectors)
            out[held] = classical_probs(model, rows.take(held), multi_label, vectors)
        probs[name], seconds[name] = out, time.time() - t0
        print(f"  {name}: {seconds[name]:.0f} s", flush=True)
    return probs, seconds, fold_of


def score(name: str, rows, labels: np.ndarray, multi_label: bool, k: int) -> list[dict]:
    print(f"{name}: {len(labels)} rows, {k} folds", flush=True)
    probs, seconds, fold_of = cross_fitted(rows, labels, multi_label, k)
    probs["average of all"] = np.mean([probs[m] for m in CLASSICAL], axis=0)
    table = []
    for member, p in probs.items():
        rules = score_rules(p, labels, multi_label, fold_of)
        rule = best_rule(rules)
        table.append({"data": name, "member": member, "cross-fitted out-of-fold": rules[rule]["crossfit"], "rule": rule,
                      "seconds": seconds.get(member), "× tfidf-lr seconds": seconds[member] / seconds["tfidf-lr"]
                      if member in seconds else None})
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nikl", default=str(REPO.parent / "shared" / "data" / "nikl_ea_2023"))
    ap.add_argument("--nsmc", default=str(REPO.parent / "shared" / "data" / "nsmc_like"))
    ap.add_argument("--nsmc-rows", type=int, default=30_000, help="the NSMC-like train file's first rows")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--results", default=str(REPO / "results" / "classical-bench"))
    args = ap.parse_args(argv)
    started, table = time.time(), []
    nikl = get_task("nikl-emotion")
    rows = read_rows([Path(args.nikl) / "train.jsonl", Path(args.nikl) / "dev.jsonl"], nikl)
    table += score("NIKL train+dev", rows.inputs(), rows.labels, True, args.folds)
    with tempfile.TemporaryDirectory() as tmp:  # the first rows, as nikl_cpu's NSMC runs read them
        lines = (Path(args.nsmc) / "ratings_train.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        head = Path(tmp) / "ratings_train.txt"
        head.write_text("".join(lines[: args.nsmc_rows + 1]), encoding="utf-8")
        rows = read_rows(head, get_task("sentence-sentiment"))
    table += score(f"NSMC-like first {len(rows)}", rows.inputs(), rows.labels, False, args.folds)
    out = Path(args.results)
    write_result(out / "classical_members.json", {"folds": args.folds, "table": table, "total_seconds": time.time() - started},
                 f"# Classical members, cross-fitted ({args.folds} folds)\n\n{markdown(table)}\n\n"
                 f"{(time.time() - started) / 60:.1f} min in all.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
