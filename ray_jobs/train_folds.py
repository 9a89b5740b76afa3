"""Train every fold × backbone of an experiment as Ray Train runs.

Locally:      python ray_jobs/train_folds.py --config nikl_ray/examples/tiny.yaml --local
On a cluster: ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/train_folds.py --config my.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
import nikl_ray as nr  # noqa: E402
from nikl_ray.cli import job  # noqa: E402


if __name__ == "__main__":
    sys.exit(job(__doc__, lambda run, args: print(f"train table: {nr.train(run)}")))
