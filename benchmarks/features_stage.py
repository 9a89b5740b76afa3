"""What the stages after training cost when each final Train run made its fold model's features
(`taken`) and when Ray tasks load every fold model again to compute them (`computed`).

    python benchmarks/features_stage.py                   # 3 rounds, alternated, on this machine
    python benchmarks/features_stage.py --rounds 5 --out results/features_stage

Trains the tiny example (`nikl_ray/examples/tiny.yaml`: two tiny backbones × 2 folds + TF-IDF) once
with `nikl-ray train --local`. Then, per round and setting, with the features and ensemble stages'
folders removed, one fresh `nikl-ray pipeline --local` process (split and train are found done)
runs features and ensemble; for `computed`, each run's `made.json` is set aside first, so the
features stage finds no features of the run's own. The settings alternate (and swap order each
round) so that machine noise hits both alike. Reads the pipeline's own stage times and writes
features_stage.json / .md under --out. The two stages are timed together because the ensemble's
head tasks start in the worker processes the features tasks leave behind: without neural
features tasks, they pay the imports those tasks paid.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("taken", "computed")


def cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "nikl_ray.cli", *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        sys.exit(f"nikl-ray {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out


def after_training(config: str, results: Path, setting: str) -> dict:
    """One pipeline process that finds training done; the features and ensemble stages' seconds."""
    for stage in ("features", "ensemble"):
        shutil.rmtree(results / stage, ignore_errors=True)
    made = sorted((results / "train").glob("*/features/made.json"))
    if setting == "computed":
        for m in made:
            m.rename(m.with_suffix(".aside"))
    try:
        t0 = time.time()
        out = cli("pipeline", "--config", config, "--results", str(results), "--local")
        wall = time.time() - t0
    finally:
        for m in made:
            if m.with_suffix(".aside").exists():
                m.with_suffix(".aside").rename(m)
    log = out.stdout + out.stderr
    stages = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([\d.]+) s", log.split("stage times:")[1].splitlines()[0]))
    taken, computed = log.count("→ taken from its train run"), log.count("→ computing")
    return {"setting": setting, "features_s": stages["features"], "ensemble_s": stages["ensemble"],
            "after_training_s": round(stages["features"] + stages["ensemble"], 1), "process_s": round(wall, 1),
            "features_taken": taken, "features_tasks": computed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "nikl_ray" / "examples" / "tiny.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "results" / "features_stage"))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    results = out / "run"
    t0 = time.time()
    cli("train", "--config", args.config, "--results", str(results), "--local")
    print(f"trained once ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for r in range(args.rounds):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            rows.append({"round": r + 1, **after_training(args.config, results, setting)})
            print(json.dumps(rows[-1]), flush=True)
    median = {s: statistics.median(x["after_training_s"] for x in rows if x["setting"] == s) for s in SETTINGS}
    result = {"config": args.config, "rounds": args.rounds, "runs": rows, "median_after_training_s": median,
              "computed_over_taken": median["computed"] / median["taken"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "features_stage.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| round | setting | features s | ensemble s | features + ensemble s | process s | taken / tasks |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['round']} | {x['setting']} | {x['features_s']:.1f} | {x['ensemble_s']:.1f} | "
              f"{x['after_training_s']:.1f} | {x['process_s']:.1f} | {x['features_taken']} / {x['features_tasks']} |"
              for x in rows]
    lines.append(f"\nmedian features + ensemble: taken {median['taken']:.1f} s, computed {median['computed']:.1f} s "
                 f"(computed / taken = {result['computed_over_taken']:.2f})")
    (out / "features_stage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
