"""Search one backbone's hyper-parameters with Ray Tune + Optuna (leaderboard + best_config.yaml).

Locally:      python ray_jobs/tune_backbone.py --config nikl_ray/examples/tiny.yaml --backbone neox-tiny-lora --local
On a cluster: ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/tune_backbone.py --config my.yaml --backbone polyglot-1.3b
A search that was cut off resumes when the same job is submitted again; a finished one is skipped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
import nikl_ray as nr  # noqa: E402
from nikl_ray.api import to_tune  # noqa: E402
from nikl_ray.cli import job  # noqa: E402


def options(parser):
    parser.add_argument("--backbone", action="append", help="backbone to tune (repeatable; default: those with a "
                                                            "search space, else every backbone)")
    parser.add_argument("--num-samples", type=int, help="trials (default: the experiment's search.num_samples)")


def body(run, args) -> None:
    for name in to_tune(run, args.backbone):
        print(f"{name}: {nr.tune(run, name, num_samples=args.num_samples)}")


if __name__ == "__main__":
    sys.exit(job(__doc__, body, options=options))
