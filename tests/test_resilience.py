"""Crashes, kills, bad artifacts and out-of-memory: nothing finished is lost, nothing broken is used."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import DEMO_DIR
from nikl_ray.artifacts import load_manifest, manifest_problem, write_manifest, write_text
from nikl_ray.backbones import BackboneSpec
from nikl_ray.worker import oom_message, read_history, run_with_oom_retry


# ---------------------------------------------------------------------------- out of memory
def _spec(tiny_backbones, **kw):
    return BackboneSpec(name="neox", checkpoint=str(tiny_backbones["gpt_neox"]), mode="lora", batch_size=16, **kw)


def test_out_of_memory_names_backbone_fold_batch_and_estimate(tiny_backbones):
    def fit(spec, model):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError) as e:
        run_with_oom_retry(_spec(tiny_backbones), 3, 2.96, None, fit, lambda: None)
    msg = str(e.value)
    for part in ("backbone neox", "fold 3", "batch size 16", "placement estimate 3.0 GB", "oom_retry: true"):
        assert part in msg


def test_oom_retry_halves_the_batch_and_keeps_the_effective_batch(tiny_backbones):
    seen = []

    def fit(spec, model):
        seen.append((spec.batch_size, spec.grad_accum))
        if spec.batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    run_with_oom_retry(_spec(tiny_backbones, oom_retry=True), 0, 1.0, object(), fit, lambda: object())
    assert seen == [(16, 1), (8, 2), (4, 4)]


def test_other_errors_are_not_mistaken_for_out_of_memory(tiny_backbones):
    def fit(spec, model):
        raise ValueError("bad label")

    with pytest.raises(ValueError, match="bad label"):
        run_with_oom_retry(_spec(tiny_backbones, oom_retry=True), 0, 1.0, None, fit, lambda: None)
    assert "batch size 8" in oom_message(_spec(tiny_backbones), 0, None, 8)


# ---------------------------------------------------------------------------- artifacts
SPLIT = "nikl_ray.stages.split"


def test_a_truncated_or_altered_artifact_is_named(tmp_path):
    write_text(tmp_path / "a.txt", "hello")
    write_manifest(tmp_path, inputs={"x": 1}, files=[tmp_path / "a.txt"], code=SPLIT)
    assert manifest_problem(tmp_path, {"x": 1}, SPLIT) is None
    assert manifest_problem(tmp_path, {"x": 2}, SPLIT) == "inputs or config changed"
    (tmp_path / "a.txt").write_text("hell")
    assert "a.txt was truncated or altered" in manifest_problem(tmp_path, {"x": 1}, SPLIT)
    (tmp_path / "a.txt").unlink()
    assert "a.txt is missing" in manifest_problem(tmp_path, {"x": 1}, SPLIT)


def test_a_stage_whose_code_changed_reruns_and_another_stages_change_does_not_touch_it(tmp_path):
    from nikl_ray.artifacts import code_files, read_json, write_json

    split_code, train_code = {p.name for p in code_files(SPLIT)}, {p.name for p in code_files("nikl_ray.stages.train")}
    assert {"split.py", "folds.py", "data.py"} <= split_code and "stacking.py" not in split_code
    assert {"worker.py", "launcher.py", "encode.py"} <= train_code and "stacking.py" not in train_code
    write_text(tmp_path / "a.txt", "hello")
    write_manifest(tmp_path, inputs={"x": 1}, files=[tmp_path / "a.txt"], code=SPLIT)
    manifest = read_json(tmp_path / "manifest.json")
    write_json(tmp_path / "manifest.json", {**manifest, "code_version": manifest["code_version"] + "-older"})
    assert "its code changed" in manifest_problem(tmp_path, {"x": 1}, SPLIT)


@pytest.mark.slow
def test_a_stage_recomputes_a_truncated_feature_file_instead_of_using_it(stacked, caplog):
    from nikl_ray.stages import features

    exp, data, _ = stacked
    target = exp.layout.features("tfidf-lr", 0) / "oof_probs.npy"
    before = np.load(target, allow_pickle=False)
    target.write_bytes(target.read_bytes()[:100])
    with caplog.at_level("INFO", logger="nikl_ray"):
        features.run(exp, data)
    assert "oof_probs.npy was truncated or altered" in caplog.text
    np.testing.assert_array_equal(np.load(target, allow_pickle=False), before)


# ---------------------------------------------------------------------------- kills
def _config(tmp_path, tiny_backbones, name="exp.yaml", results="res") -> Path:
    cfg = {"task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "results": str(tmp_path / results),
           "folds": {"k": 2, "seed": 0}, "classical": False,
           "backbones": [{"name": "neox", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora", "lr": 5e-3,
                          "epochs": 4, "early_stopping_patience": 4, "batch_size": 16, "max_length": 40}]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()) if run_dir.exists() else []


def _registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train has recorded a checkpoint for the run (what a restart restores from). A
    checkpoint folder shows up while it is still being copied, before Ray registers it."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return snapshot.get("latest_checkpoint_result") is not None


def _resumed(history: list[dict]) -> bool:
    """True when the process that wrote the run's last epochs started from a checkpoint (each
    evaluation logs the step its process started from) and every epoch was evaluated exactly once."""
    epochs = [h["epoch"] for h in history if "eval_score" in h]
    starts = [h["resumed_from_step"] for h in history if "resumed_from_step" in h]
    return epochs == sorted(set(epochs)) and any(s > 0 for s in starts)


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_retried_and_the_run_completes(tmp_path, tiny_backbones, ray_local):
    import psutil
    from ray.util.state import list_actors

    from conftest import setup_run
    from nikl_ray.cluster import api_server
    from nikl_ray.stages import train

    exp, data = setup_run(yaml.safe_load(_config(tmp_path, tiny_backbones).read_text()))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("summary", train.run(exp, data)))
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not _registered_checkpoint(exp.layout.pair("neox", 0)):
        time.sleep(0.2)
    # this Ray instance's Train workers only (other tests may run their own Ray beside it)
    workers = list_actors(address=api_server(), filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers, "no Ray Train worker found"
    for w in workers:
        psutil.Process(w.pid).kill()
    thread.join(600)
    assert "summary" in outcome
    m = load_manifest(exp.layout.pair("neox", 0))
    assert m["epochs_run"] == 4
    assert _resumed(read_history(_checkpoints(exp.layout.pair("neox", 0))[-1])), "the retried worker started over"


@pytest.mark.slow
def test_a_killed_driver_resumes_without_retraining_and_matches_an_uninterrupted_run(tmp_path, tiny_backbones, ray_local):
    """SIGKILL the driver (and its Ray) mid-train; the same command again skips the finished fold,
    resumes the interrupted one from its last checkpoint, and ends with the same weights as a run
    that was never interrupted (CPU training with fixed seeds is deterministic)."""
    from safetensors.numpy import load_file

    from conftest import setup_run
    from nikl_ray.stages import train

    config = _config(tmp_path, tiny_backbones)
    exp, data = setup_run(yaml.safe_load(config.read_text()))
    pair = exp.layout.pair
    cmd = [sys.executable, "-m", "nikl_ray.cli", "train", "--config", str(config), "--local", "--num-cpus", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # one CPU: fold 0 trains to the end, then fold 1 starts; kill once fold 1 has a checkpoint
        deadline = time.time() + 400
        while time.time() < deadline and not (_registered_checkpoint(pair("neox", 1))
                                               and (pair("neox", 0) / "manifest.json").exists()):
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (pair("neox", 1) / "manifest.json").exists(), "fold 1 finished before the kill"
    fold0 = (pair("neox", 0) / "manifest.json").read_text()

    summary = train.run(exp, data)
    status = {r["fold"]: r["status"] for r in csv.DictReader(open(summary))}
    assert status == {"0": "skipped (done)", "1": "trained"}
    assert (pair("neox", 0) / "manifest.json").read_text() == fold0
    resumed = load_manifest(pair("neox", 1))
    latest = _checkpoints(pair("neox", 1))[-1]
    assert _resumed(read_history(latest)), "fold 1 started over instead of resuming"

    reference, ref_data = setup_run(yaml.safe_load(_config(tmp_path, tiny_backbones, "ref.yaml", "ref").read_text()))
    ref_pair = reference.layout.pair
    shutil.copytree(pair("neox", 0), ref_pair("neox", 0))  # only fold 1 is compared
    train.run(reference, ref_data)
    ref = load_manifest(ref_pair("neox", 1))
    a = load_file(str(pair("neox", 1) / resumed["best_checkpoint"] / "adapter_model.safetensors"))
    b = load_file(str(ref_pair("neox", 1) / ref["best_checkpoint"] / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    assert resumed["heldout_micro_f1"] == pytest.approx(ref["heldout_micro_f1"], abs=1e-6)
