"""Continue pretraining backbones on unlabeled text (their `pretrain:` sections) on several Ray Train workers.

Locally:      python ray_jobs/pretrain.py --config my.yaml --local
On a cluster: ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/pretrain.py --config my.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
import nikl_ray as nr  # noqa: E402
from nikl_ray.cli import job  # noqa: E402


if __name__ == "__main__":
    sys.exit(job(__doc__, lambda run, args: print(nr.pretrain(run))))
