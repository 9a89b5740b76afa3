"""Search one backbone's hyper-parameters with Ray Tune + Optuna (leaderboard + best_config.yaml).

Locally:      python ray_jobs/tune_backbone.py --config nikl_ray/examples/tiny.yaml --backbone neox-tiny-lora --local
On a cluster: ray job submit --working-dir . -- python ray_jobs/tune_backbone.py --config my.yaml --backbone polyglot-1.3b
Resume:       add --resume
"""

import sys

from nikl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
