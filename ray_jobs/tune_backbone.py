"""Search one backbone's hyper-parameters with Ray Tune + Optuna (leaderboard + best_config.yaml).

Locally:      python ray_jobs/tune_backbone.py --config nikl_ray/examples/tiny.yaml --backbone neox-tiny-lora --local
On a cluster: ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/tune_backbone.py --config my.yaml --backbone polyglot-1.3b
Resume:       add --resume
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
from nikl_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
