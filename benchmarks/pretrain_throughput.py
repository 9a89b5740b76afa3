"""Packed against padded pretraining, on the same corpus, machine and init, at equal tokens.

    python benchmarks/pretrain_throughput.py                    # reads ../shared/data/nikl_ea_2023
    python benchmarks/pretrain_throughput.py --rounds 2 --steps 150 --kind gpt_neox --out results/pretrain_tp

Two backbones of one tiny random init (`tiny:<kind>`, its tokenizer trained on the corpus) continue
pretraining through the real pretrain stage (`nikl-ray pretrain`: Ray Train, one worker holding
both cores, as benchmarks/nikl_cpu.py pretrains) for `--steps` steps each: `padded` (`packing:
false`: `--batch-size` texts per step, padded to the batch's longest) and `packed` (full
`max_length` blocks, as many per step as carry the padded step's tokens: equal tokens per step and
in all, equal optimizer steps). Rounds alternate which goes first. Per arm: tokens
the model learns from per second (non-padding tokens seen / HF's train_runtime), steps/s, and the
held-out perplexity (the same held-out texts, read one text per row, for both). Writes
`pretrain_throughput.md` under `--out`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nikl_ray.artifacts import read_json  # noqa: E402
from nikl_ray.tables import markdown  # noqa: E402

ARMS = ("padded", "packed")


def experiment(args, results: Path, order: tuple, batch: dict) -> dict:
    data = Path(args.data_dir)
    corpus = [str(data / "train.jsonl"), str(data / "dev.jsonl")]
    common = {"corpus": corpus, "steps": args.steps, "max_length": args.max_length, "lr": 1e-3,
              "num_workers": 1, "cpus_per_worker": 2, "save_every_steps": 10**6}
    return {"task": "nikl-emotion", "train": [str(data / "train.jsonl")], "results": str(results), "tracking": "none",
            "backbones": [{"name": arm, "checkpoint": f"tiny:{args.kind}", "pretrain": {
                **common, "batch_size": batch[arm], "packing": arm == "packed"}} for arm in order]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "nikl_ea_2023"))
    ap.add_argument("--kind", default="gpt_neox", choices=["gpt_neox", "llama", "electra", "roberta", "bert"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64, help="texts per step of the padded arm")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "results" / "pretrain_throughput"))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    batch = {"padded": args.batch_size, "packed": packed_batch(args, out)}
    print(f"rows per step: {batch} (equal tokens)", flush=True)
    runs = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        order = ARMS if r % 2 == 0 else ARMS[::-1]
        config = out / f"round{r}.yaml"
        config.write_text(yaml.safe_dump(experiment(args, out / f"round{r}", order, batch)))
        subprocess.run([sys.executable, "-m", "nikl_ray.cli", "-q", "pretrain", "--config", str(config), "--local"],
                       check=True, cwd=REPO)
        for arm in ARMS:
            final = read_json(out / f"round{r}" / "pretrain" / arm / f"{arm}-pretrain" / "final.json")
            runs[arm].append(final)
            print(f"round {r + 1} {arm}: {final['tokens_seen']} tokens in {final['train_runtime']:.1f} s, "
                  f"held-out perplexity {final['heldout_perplexity']:.2f}", flush=True)
    rate = {arm: [f["tokens_seen"] / f["train_runtime"] for f in fs] for arm, fs in runs.items()}
    rows = [{"arm": arm, "rows per step": batch[arm], "tokens seen (median)": int(statistics.median(f["tokens_seen"] for f in fs)),
             "tokens/s (median)": round(statistics.median(rate[arm])),
             "steps/s (median)": round(statistics.median(f["steps"] / f["train_runtime"] for f in fs), 2),
             "held-out perplexity (median)": round(statistics.median(f["heldout_perplexity"] for f in fs), 2),
             "tokens/s ratio to padded (paired by round)": round(statistics.median(
                 a / b for a, b in zip(rate[arm], rate["padded"])), 3)} for arm, fs in runs.items()]
    table = markdown(rows)
    (out / "pretrain_throughput.md").write_text(
        f"# Pretraining throughput: packed vs padded\n\n{args.kind}, {args.steps} steps, max_length "
        f"{args.max_length}, {args.rounds} rounds\n\n{table}")
    print(table)
    return 0


def packed_batch(args, out: Path) -> int:
    """The packed blocks per step that carry a padded step's tokens: the padded rows' mean length (each
    text cut at max_length, over the whole corpus, with the tokenizer the tiny init is built with) × its batch
    / max_length."""
    from transformers import AutoTokenizer

    from nikl_ray import open_run
    from nikl_ray.corpus import pretrain_corpus

    run = open_run(experiment(args, out / "tokenizer", ARMS, {"padded": 1, "packed": 1}))  # builds the tiny init
    spec = run.config.backbones[0]
    texts, _ = pretrain_corpus(run.config, spec)
    tokenizer = AutoTokenizer.from_pretrained(spec.checkpoint)
    lengths = [min(len(ids), args.max_length) for ids in tokenizer(texts)["input_ids"]]
    return max(1, round(args.batch_size * statistics.mean(lengths) / args.max_length))


if __name__ == "__main__":
    raise SystemExit(main())
