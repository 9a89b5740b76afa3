"""Generative QA on the real Hansol Deco QA data, on a CPU machine, in about 30 minutes.

    python benchmarks/hansol_cpu.py                       # reads ../shared/data/hansol_qa
    python benchmarks/hansol_cpu.py --folds 3 --epochs 6 --pretrain-minutes 3 --results results/hansol-bench

Two tiny random-init decoders, GPT-NeoX (polyglot-ko's shape) and Llama, with a byte-level BPE
tokenizer trained on the task's text (questions and references of every training item: its
vocabulary, as a classification run's tokenizer learns from every row's text), first continue
their pretraining as causal LMs on the training *questions* (both phrasings;
`--pretrain-minutes` each). Not on the answers: they are what the folds score, and a model
pretrained on them has seen every held-out item's answers. Then, per fold, on Ray Train:
GPT-NeoX fully fine-tuned with and without the nearest training item in the prompt
(`retrieve: {k: 1}`), Llama with LoRA, GPT-NeoX prefix-tuned (with its projection); the
retrieval member (TF-IDF nearest question → its first answer, and the references of the five
nearest items as its candidates); MBR over all of them, and MBR over the cross-fitted best few. Scored as the competition did: the cosine
of sentence embeddings (multilingual USE v3 here, offline), max(cos, 0) averaged over an item's
five references.

Writes `benchmark.json` / `benchmark.md` beside the results: every candidate's out-of-fold
cosine (per category too, in the report), which was submitted, time per stage, every
candidate's own test answers (so each can be scored on the held-out answers elsewhere), and
what retrieval alone gives out of fold with MBR over the references of 1–8 nearest items
(after the run: it is not counted in the stage times).
All numbers come from this one run.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nikl_ray as nr  # noqa: E402
from nikl_ray.api import Clock  # noqa: E402
from nikl_ray.artifacts import read_json, write_json, write_text  # noqa: E402
from nikl_ray.tables import markdown  # noqa: E402

QUESTIONS = ["질문_1", "질문_2"]


def bases(args, data: Path) -> dict:
    """The pretraining experiment: one tiny decoder per shape, pretrained on the training questions."""
    pretrain = {"corpus": [{"path": str(data / "train.csv"), "field": QUESTIONS}], "minutes": args.pretrain_minutes,
                "batch_size": 32, "max_length": 48, "lr": 2e-3, "num_workers": 1, "cpus_per_worker": 2, "heldout": 0.05}
    return {"task": "hansol-qa", "train": str(data / "train.csv"), "test": str(data / "test.csv"), "results": args.results,
            "folds": {"k": args.folds, "seed": 42, "selection": 0.1},
            "backbones": [{"name": f"{kind}-base", "checkpoint": f"tiny:{kind}", "pretrain": pretrain}
                          for kind in ("gpt_neox", "llama")]}


def experiment(args, data: Path, pretrained: dict[str, Path]) -> dict:
    neox, llama = str(pretrained["gpt_neox-base"]), str(pretrained["llama-base"])
    rag = {"retrieve": {"k": 1}, "max_length": 192}
    return {
        **bases(args, data), "classical": True, "retrieval_items": 5,
        "defaults": {"epochs": args.epochs, "batch_size": 16, "max_length": 128, "max_new_tokens": 64,
                     "early_stopping_patience": 2, "select_questions": 48, "lr": 1e-3},
        "backbones": [
            {"name": "neox-full", "checkpoint": neox, "mode": "full"},
            {"name": "llama-lora", "checkpoint": llama, "mode": "lora", "lora_r": 32, "lr": 3e-3},
            {"name": "neox-prefix", "checkpoint": neox, "mode": "prefix", "prefix_tokens": 16, "prefix_projection": True,
             "lr": 1e-2},
            {"name": "neox-full-rag", "checkpoint": neox, "mode": "full", **rag},
        ][:args.members],
        "ensemble": {"inner_folds": 5},
    }


def retrieval_ablation(run, items=(1, 2, 3, 5, 8)) -> dict[str, float]:
    """Out of fold, on the run's folds: the nearest training item's first reference (the retrieval
    member), and MBR over every reference of the n nearest items, for each n (what
    `retrieval_items` sets)."""
    import numpy as np

    from nikl_ray.folds import fold_positions
    from nikl_ray.qa.data import queries
    from nikl_ray.qa.metrics import get_embedder, mbr_choose, score_answers
    from nikl_ray.qa.sft import Retriever

    rows, folds, embedder = run.inputs.rows, run.folds, get_embedder("use")
    got: dict[str, list] = {"nearest item's first answer": []} | {f"MBR over the {n} nearest items": [] for n in items}
    for fold in range(folds["k"]):
        train, select, held = fold_positions(rows, folds, fold)
        qs = queries(rows.ids, rows.questions, rows.contexts, held)
        near = Retriever(rows.questions, np.concatenate([train, select])).nearest([q.question for q in qs], max(items))
        refs = [rows.answers[q.item] for q in qs]
        got["nearest item's first answer"] += list(score_answers("cosine", [rows.answers[n[0]][0] for n in near], refs, embedder))
        for n in items:
            pools = [[a for i in near_[:n] for a in rows.answers[i]] for near_ in near]
            picks = mbr_choose("cosine", pools, embedder=embedder)
            got[f"MBR over the {n} nearest items"] += list(score_answers("cosine", [p[i] for p, i in zip(pools, picks)], refs, embedder))
    return {k: float(np.mean(v)) for k, v in got.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "hansol_qa"))
    p.add_argument("--results", default=str(REPO / "results" / "hansol-bench"))
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--pretrain-minutes", type=float, default=2.5, help="Per decoder shape.")
    p.add_argument("--members", type=int, default=4, help="Neural members (the first N of the list).")
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args(argv)
    from nikl_ray.cli import setup_logging

    setup_logging(0)
    data = Path(args.data_dir)
    t0 = time.time()
    base_run = nr.open_run(bases(args, data))
    nr.connect(base_run, local=True, num_cpus=args.num_cpus)
    clock = Clock()
    pretrained = clock("pretrain", nr.pretrain, base_run)
    run = nr.open_run(experiment(args, data, pretrained))
    out = nr.pipeline(run)
    seconds = {**clock.seconds, **out["stage_seconds"]}
    report, layout = read_json(run.layout.report_json), run.layout
    candidates = {}
    for name in report["oof_score"]:
        path = layout.candidate_submission(name, run.config.task.suffix)
        answers = {r["id"]: r["answer"] for r in csv.DictReader(path.open(encoding="utf-8"))} if path.exists() else None
        candidates[name] = {"oof_cosine": report["oof_score"][name], "candidate": name in report["candidates"],
                            "test_answers": answers}
    chosen = report["chosen"]
    bench = {"data": str(data), "folds": args.folds, "epochs": args.epochs, "pretrain_minutes": args.pretrain_minutes,
             "wall_minutes": (time.time() - t0) / 60, "stage_seconds": seconds, "submitted": chosen["name"],
             "submitted_oof_cosine": chosen["score"], "retrieval_oof_cosine": chosen["retrieval_score"],
             "candidates": candidates, "train_table": str(out["train_summary"]), "report": str(out["report"]),
             "retrieval_ablation": retrieval_ablation(run)}
    write_json(layout.root / "benchmark.json", bench)
    rows = [{"candidate": n, "out-of-fold cosine": c["oof_cosine"],
             "role": "submitted" if n == chosen["name"] else "candidate" if c["candidate"] else "left out"}
            for n, c in sorted(candidates.items(), key=lambda kv: -kv[1]["oof_cosine"])]
    text = (f"# Hansol QA on CPU\n\n{args.folds} folds, {args.epochs} epochs at most, {args.pretrain_minutes:g} min of "
            f"pretraining per decoder; {bench['wall_minutes']:.1f} min wall.\n\n{markdown(rows)}\n\n"
            + "stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n\n"
            + "Retrieval alone, out of fold (the run's folds):\n\n"
            + markdown([{"answer": k, "out-of-fold cosine": v} for k, v in bench["retrieval_ablation"].items()]) + "\n")
    write_text(layout.root / "benchmark.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
