"""`ray start --head` on loopback, `ray job submit` of the pipeline job, and `ray stop` afterwards."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_DIR

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args, env, timeout=600):
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray_cli), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _stop_cluster(temp: Path) -> int:
    """`ray stop` for this cluster only (plain `ray stop` ends every Ray process on the machine):
    its processes are the ones whose command line names its private temp dir."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp) in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
    return len(procs)


def test_pipeline_job_submitted_to_a_real_cluster_succeeds_and_writes_its_submission(tmp_path, tiny_backbones):
    results = tmp_path / "results"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "test": str(DEMO_DIR / "test.jsonl"),
        "results": str(results), "folds": {"k": 2, "seed": 0},
        "backbones": [{"name": "neox", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora", "epochs": 2,
                       "lr": 5e-3, "max_length": 40}],
        "ensemble": {"hidden_sizes": [16, 32], "inner_folds": 2, "epochs": 30, "patience": 5}}))
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-job-test-{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}
    # Own ports for the node's agents too: their defaults (e.g. 52365 for the job agent) are held by
    # any other Ray instance on the machine, and the job server then has "No available agent".
    start = _ray("start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                 f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                 "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats", env=env)
    assert start.returncode == 0, start.stderr
    try:
        for _ in range(30):  # the job agent comes up a little after `ray start` returns
            submit = _ray("job", "submit", "--address", f"http://127.0.0.1:{dash}", "--runtime-env",
                          "ray_jobs/runtime_env.yaml", "--", "python", "ray_jobs/pipeline.py", "--config", str(config), env=env)
            out = submit.stdout + submit.stderr
            if "No available agent" not in out:
                break
            time.sleep(2)
        assert submit.returncode == 0, out[-4000:]
        job_id = re.search(r"Job '([^']+)' submitted successfully", out).group(1)
        status = _ray("job", "status", "--address", f"http://127.0.0.1:{dash}", job_id, env=env)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        assert re.search(r"\bsucceeded\b", plain, re.I), plain
        assert "submission:" in out  # the pipeline's own summary reached the job log
    finally:
        stopped = _stop_cluster(temp)
        assert stopped, "found no processes of the cluster this test started"
    sub = results / "ensemble" / "submission.jsonl"
    from nikl_ray.data import read_rows
    from nikl_ray.tasks import get_task

    rows = read_rows(sub, get_task("nikl-emotion"), labelled=True)
    assert rows.ids == read_rows(DEMO_DIR / "test.jsonl", get_task("nikl-emotion")).ids
