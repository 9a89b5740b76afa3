"""Distil a finished run into one student (Ray Train), score it beside the ensemble, export it for CPU.

Locally:      python ray_jobs/distill.py --config nikl_ray/examples/tiny.yaml --local
On a cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env ray_jobs/runtime_env.yaml \\
                  -- python ray_jobs/distill.py --results results/nikl [--student BACKBONE] [--pool unlabelled.jsonl]
Then:         ray job submit … -- python ray_jobs/serve.py --results results/nikl --student int8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if nikl-ray is not installed
import nikl_ray as nr  # noqa: E402
from nikl_ray.cli import job  # noqa: E402


def options(parser) -> None:
    parser.add_argument("--student", help="the backbone the student starts from (default: distill.student, else the "
                                          "first encoder)")
    parser.add_argument("--pool", nargs="+", help="unlabelled rows the ensemble labels for the student")


def body(run, args) -> None:
    print(f"student report: {nr.distill(run, student=args.student, pool=args.pool)}")


if __name__ == "__main__":
    sys.exit(job(__doc__, body, options=options))
