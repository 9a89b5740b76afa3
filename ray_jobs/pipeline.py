"""The whole pipeline (split → tune → train → features → ensemble → submit) as one Ray job.

Locally:      python ray_jobs/pipeline.py --config nikl_ray/examples/tiny.yaml --local
On a cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env ray_jobs/runtime_env.yaml \\
                  -- python ray_jobs/pipeline.py --config my.yaml [--tune]
Follow:       ray job logs --address http://127.0.0.1:8265 -f <submission id>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
from nikl_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
