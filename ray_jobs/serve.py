"""Serve a finished run on a cluster's Ray Serve (the deployment outlives this job).

Locally:      python ray_jobs/serve.py --results results/nikl --local          # serves until Ctrl-C
On a cluster: ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/serve.py --results results/nikl
Then:         curl -s http://127.0.0.1:8000/predict -d '{"text": "오늘 영화 너무 좋다"}'

It needs only the finished run's results folder (and the base checkpoints adapters sit on).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
import nikl_ray as nr  # noqa: E402
from nikl_ray.cli import serve_options, job  # noqa: E402
from nikl_ray.serve import serve_run  # noqa: E402


def body(predictor, args) -> None:
    nr.connect(local=args.local, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    serve_run(predictor.layout.root, host=args.host, port=args.port, replicas=args.replicas, student=args.student,
              block=args.local)


if __name__ == "__main__":
    sys.exit(job(__doc__, body, options=serve_options, finished=True))
