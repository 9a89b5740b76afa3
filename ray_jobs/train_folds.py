"""Train every fold × backbone of an experiment as Ray Train runs.

Locally:      python ray_jobs/train_folds.py --config nikl_ray/examples/tiny.yaml --local
On a cluster: ray job submit --working-dir . -- python ray_jobs/train_folds.py --config my.yaml
"""

import sys

from nikl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
