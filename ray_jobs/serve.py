"""Serve a finished run on a cluster's Ray Serve (the deployment outlives this job).

Locally:      python ray_jobs/serve.py --config my.yaml --local          # serves until Ctrl-C
On a cluster: ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/serve.py --config my.yaml
Then:         curl -s http://127.0.0.1:8000/predict -d '{"text": "오늘 영화 너무 좋다"}'
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
from nikl_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
