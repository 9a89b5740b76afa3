"""Features of every trained fold model, then the stacked ensemble, report and submission.

Locally:      python ray_jobs/build_ensemble.py --config nikl_ray/examples/tiny.yaml --local
On a cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env ray_jobs/runtime_env.yaml \\
                  -- python ray_jobs/build_ensemble.py --config my.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
import nikl_ray as nr  # noqa: E402
from nikl_ray.cli import job  # noqa: E402


def body(run, args) -> None:
    nr.features(run)
    print(f"report: {nr.ensemble(run)}")


if __name__ == "__main__":
    sys.exit(job(__doc__, body))
