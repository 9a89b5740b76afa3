"""Features of every trained fold model, then the stacked ensemble, report and submission.

Locally:      python ray_jobs/build_ensemble.py --config nikl_ray/examples/tiny.yaml --local
On a cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env ray_jobs/runtime_env.yaml \\
                  -- python ray_jobs/build_ensemble.py --config my.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
from nikl_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    code = main(["features", *args])
    sys.exit(code or main(["ensemble", *args]))
