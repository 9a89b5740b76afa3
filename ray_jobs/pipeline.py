"""The whole pipeline (split → (pretrain) → (tune) → train → features → ensemble → submit) as one Ray job.

Locally:      python ray_jobs/pipeline.py --config nikl_ray/examples/tiny.yaml --local
On a cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env ray_jobs/runtime_env.yaml \\
                  -- python ray_jobs/pipeline.py --config my.yaml [--tune]
Follow:       ray job logs --address http://127.0.0.1:8265 -f <submission id>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
import nikl_ray as nr  # noqa: E402
from nikl_ray.cli import job  # noqa: E402


def options(parser):
    parser.add_argument("--tune", action="store_true", help="search first, for backbones with a search space")


if __name__ == "__main__":
    sys.exit(job(__doc__, lambda run, args: nr.pipeline(run, tune_first=args.tune), options=options))
