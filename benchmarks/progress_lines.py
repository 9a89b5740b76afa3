"""How often a long CPU epoch says where it is: `nikl-ray train` on the real NIKL rows, each line
of its console stamped as it arrives.

    python benchmarks/progress_lines.py                      # reads ../shared/data/nikl_ea_2023
    python benchmarks/progress_lines.py --rows 8000 --out results/progress

One epoch of a small random-init GPT-NeoX (polyglot-ko's block at hidden 256, 4 layers; full
fine-tuning) on each of 2 folds, the two runs side by side on this machine's cores, tracked by TensorBoard, MLflow and W&B (offline) as users configure them.
Per run: its training time (HF's, read back from the run's TensorBoard events), the progress
lines inside its epoch and the longest gap between two consecutive lines of that run, the epoch line included (the aim: at most `progress_seconds`,
30 s, plus one step). Writes `progress_lines.md` under `--out`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nikl_ray.tables import markdown  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "nikl_ea_2023"))
    ap.add_argument("--rows", type=int, help="the first this many training rows (default: all)")
    ap.add_argument("--out", default=str(REPO / "results" / "progress"))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train = out / "train.jsonl"  # a slice of the licensed file, under the (git-ignored) results folder
    with open(Path(args.data_dir) / "train.jsonl", encoding="utf-8") as f:
        train.write_text("".join(islice(f, args.rows)), encoding="utf-8")
    checkpoint = small_decoder(train, out / "neox-256")
    config = out / "experiment.yaml"
    config.write_text(yaml.safe_dump({
        "task": "nikl-emotion", "train": str(train), "results": str(out / "res"), "folds": {"k": 2, "seed": 0},
        "classical": False, "tracking": ["tensorboard", "mlflow", {"wandb": {"mode": "offline"}}],
        "backbones": [{"name": "neox", "checkpoint": str(checkpoint), "mode": "full", "epochs": 1, "batch_size": 32,
                       "max_length": 128, "lr": 1e-3}]}))
    cmd = [sys.executable, "-m", "nikl_ray.cli", "train", "--config", str(config), "--local"]
    stamped = []
    t0 = time.time()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO) as proc:
        for line in proc.stdout:
            stamped.append((time.time() - t0, line.rstrip()))
            print(f"{stamped[-1][0]:7.1f}  {stamped[-1][1]}", flush=True)
    if proc.returncode:
        print(f"train failed ({proc.returncode})", file=sys.stderr)
        return 1
    rows = []
    for run in sorted({m.group(1) for _, line in stamped if (m := re.search(r"(neox-fold\d) step \d+/", line))}):
        steps = [t for t, line in stamped if re.search(rf"{run} step \d+/", line)]
        epoch = next(t for t, line in stamped if re.search(rf"{run} epoch 1/1", line))
        seen = [t for t in steps if t < epoch] + [epoch]
        rows.append({"run": run, "training seconds (HF's train_runtime, from its TensorBoard events)":
                     round(train_runtime(out / "res" / "train" / run / "tensorboard"), 1),
                     "progress lines inside the epoch": len(seen) - 1,
                     "longest gap between its lines (s)": round(max(b - a for a, b in zip(seen, seen[1:])), 1)})
    table = markdown(rows)
    (out / "progress_lines.md").write_text(f"# Progress lines\n\n`{' '.join(cmd[1:])}`, {args.rows or 'all'} rows\n\n{table}")
    print(table)
    return 0 if rows else 1


def small_decoder(train: Path, out: Path) -> Path:
    """A random-init GPT-NeoX between the tests' tiny one and a real one, its tokenizer trained on `train`."""
    from transformers import GPTNeoXConfig

    from nikl_ray.data import read_rows
    from nikl_ray.tasks import get_task
    from nikl_ray.tiny import make_random_init

    if (out / "config.json").exists():
        return out
    shape = out.parent / "neox-256-shape"
    GPTNeoXConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  rotary_pct=0.5, use_parallel_residual=True, max_position_embeddings=512,
                  tie_word_embeddings=False).save_pretrained(shape)
    return make_random_init(shape, read_rows(train, get_task("nikl-emotion")).texts, out)


def train_runtime(log_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events.Scalars("train/runtime")[-1].value


if __name__ == "__main__":
    raise SystemExit(main())
