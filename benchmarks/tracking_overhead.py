"""What tracking costs a `nikl-ray train` command: the same 2-fold tiny run with `tracking: none`,
`tensorboard` (the default) and all three trackers (W&B offline), in turn, each from a fresh train
folder (the split and the tiny backbone are built once, before timing).

    python benchmarks/tracking_overhead.py --rounds 4 --out results/tracking_overhead

Per setting: the median wall seconds of the whole command, and the median of each round's ratio
to `none` in that round (rounds alternate the settings, so the machine's drift cancels).
Writes `tracking_overhead.md` under `--out`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nikl_ray.tables import markdown  # noqa: E402

SETTINGS = {"none": "none", "tensorboard": "tensorboard",
            "all three": ["tensorboard", "mlflow", {"wandb": {"mode": "offline"}}]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "results" / "tracking_overhead"))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    demo = REPO / "nikl_ray" / "demo_data"
    configs = {}
    for name, tracking in SETTINGS.items():
        configs[name] = out / f"{name.replace(' ', '_')}.yaml"
        configs[name].parent.mkdir(parents=True, exist_ok=True)
        configs[name].write_text(yaml.safe_dump({
            "task": "nikl-emotion", "train": str(demo / "train.jsonl"), "test": str(demo / "test.jsonl"),
            "results": str(out / "res"), "folds": {"k": 2, "seed": 42}, "tracking": tracking,
            "backbones": [{"name": "neox", "checkpoint": "tiny:gpt_neox", "mode": "lora", "epochs": 3, "batch_size": 16,
                           "max_length": 48, "lr": 5e-3, "lora_r": 8}]}))

    def train(name: str) -> float:
        shutil.rmtree(out / "res" / "train", ignore_errors=True)
        shutil.rmtree(out / "res" / "tracking", ignore_errors=True)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "nikl_ray.cli", "-q", "train", "--config", str(configs[name]), "--local"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        return time.monotonic() - t0

    train("none")  # builds the split and the tiny backbone; not timed
    seconds = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name in SETTINGS:
            seconds[name].append(train(name))
            print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s", flush=True)
    rows = [{"tracking": name, "median wall s": round(statistics.median(s), 1),
             "median ratio to none (paired by round)": round(statistics.median(a / b for a, b in zip(s, seconds["none"])), 3)}
            for name, s in seconds.items()]
    table = markdown(rows)
    (out / "tracking_overhead.md").write_text(f"# Tracking overhead\n\n{args.rounds} rounds\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
