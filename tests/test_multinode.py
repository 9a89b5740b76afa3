"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), the
pipeline submitted with `ray job submit`: runs on both nodes, the one-node answer, and a results
root one node cannot see refused before anything runs."""

import re

import pytest
import yaml

from conftest import RayCluster

pytestmark = pytest.mark.slow


def _submit(cluster, config) -> tuple[str, str]:
    """(status, log) of the pipeline job."""
    import time

    for _ in range(30):  # the job agent comes up a little after `ray start` returns
        out = cluster.ray("job", "submit", "--address", cluster.dashboard, "--runtime-env", "ray_jobs/runtime_env.yaml",
                          "--", "python", "ray_jobs/pipeline.py", "--config", str(config))
        log = out.stdout + out.stderr
        if "No available agent" not in log:
            break
        time.sleep(2)
    job_id = re.search(r"Job '([^']+)' submitted successfully", log).group(1)
    status = cluster.ray("job", "status", "--address", cluster.dashboard, job_id)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    return ("succeeded" if re.search(r"\bsucceeded\b", plain, re.I) else "failed"), log


def test_the_pipeline_job_spreads_over_two_nodes_and_submits_what_one_node_submits(tmp_path, single_label_run):
    from nikl_ray.status import train_runs

    raw, one_node = single_label_run
    cluster = RayCluster("nodes")
    cluster.start_head(cpus=1)
    cluster.add_node(cpus=1, hide=tmp_path / "node-local")
    try:
        private = tmp_path / "private.yaml"
        private.write_text(yaml.safe_dump({**raw, "results": str(tmp_path / "node-local" / "res")}))
        status, log = _submit(cluster, private)
        assert status == "failed" and "is not shared: node(s)" in log and "cannot see it" in log, log[-3000:]
        assert not (tmp_path / "node-local" / "res" / "split").exists()  # refused before anything ran

        shared = tmp_path / "shared.yaml"
        shared.write_text(yaml.safe_dump({**raw, "results": str(tmp_path / "shared" / "res")}))
        status, log = _submit(cluster, shared)
        assert status == "succeeded", log[-4000:]
        assert "submission:" in log  # the pipeline's own summary reached the job log
        runs = {r["name"]: r for r in train_runs(cluster.dashboard)}
        nodes = {runs[f"neox-fold{f}"]["attempts"][-1]["workers"][0]["node_id"] for f in range(2)}
        assert len(nodes) == 2, runs  # one fold model on each node
    finally:
        assert cluster.stop(), "found no processes of the cluster this test started"
    two_nodes = (tmp_path / "shared" / "res" / "ensemble" / "submission.txt").read_text(encoding="utf-8")
    assert two_nodes == one_node["submission"].read_text(encoding="utf-8")
