"""Crashes, kills, bad artifacts and out-of-memory: nothing finished is lost, nothing broken is used."""

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import kill_the_train_worker_after_its_first_checkpoint, registered_epoch, resumed
from nikl_ray.artifacts import load_manifest, manifest_problem, write_manifest, write_text
from nikl_ray.backbones import BackboneSpec
from nikl_ray.runfiles import read_history
from nikl_ray.worker import oom_message, run_with_oom_retry


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
def _fixture_neox_only(trained, tmp_path) -> Path:
    """An experiment of the trained fixture's `neox-lora` alone, in a results root of its own: its
    fold runs have the fixture's inputs exactly, so the fixture's runs are their uninterrupted twins."""
    exp = trained[0]
    spec = exp.backbone("neox-lora")
    raw = {"task": "nikl-emotion", "train": [str(p) for p in exp.train], "results": str(tmp_path / "res"),
           "folds": exp.folds.model_dump(), "classical": False,
           "backbones": [spec.model_dump(mode="json", exclude_none=True)]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()) if run_dir.exists() else []


def _same_adapter(a_dir: Path, b_dir: Path) -> None:
    from safetensors.numpy import load_file

    a, b = load_file(str(a_dir / "adapter_model.safetensors")), load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_a_killed_worker_restarts_and_the_run_ends_as_if_nothing_happened_without_seeing_held_out_labels(trained, tmp_path):
    """A fold run with the held-out fold's labels scrambled, its Ray Train worker SIGKILLed after its
    first checkpoint: Ray Train restarts it from that checkpoint (FailureConfig), and the run ends
    with the same weights as the fixture's uninterrupted run with the true labels — the epoch is
    chosen on the selection slice, never on the held-out fold."""
    import dataclasses

    import ray

    from nikl_ray.folds import fold_positions
    from nikl_ray.launcher import fit_run
    from nikl_ray.placement import Placement
    from nikl_ray.runspec import Device, RowsPayload, fold_run

    exp, data, _ = trained
    train_idx, select_idx, held_idx = positions = fold_positions(data.rows, data.folds(exp), 0)
    assert not set(held_idx) & (set(train_idx) | set(select_idx)) and len(select_idx)
    labels = data.rows.labels.copy()
    labels[held_idx] = np.random.default_rng(0).permutation(labels[held_idx], axis=1)
    payload = dataclasses.replace(RowsPayload.of(data.rows), labels=labels)
    run = fold_run(exp, exp.backbone("neox-lora"), 0, positions, payload, Placement("neox-lora", 0.1, 0, 0.0, 1.0),
                   Device(False, "cpu"), name="scrambled", storage=str(tmp_path))
    pending = ray.remote(num_cpus=0)(fit_run).remote(run)
    kill_the_train_worker_after_its_first_checkpoint(tmp_path / "scrambled")
    out = ray.get(pending)
    assert resumed(read_history(out["latest_checkpoint"])), "the restarted worker started over"
    ref = exp.layout.pair("neox-lora", 0)
    _same_adapter(Path(out["best_checkpoint"]) / "checkpoint", ref / load_manifest(ref)["best_checkpoint"])
    assert out["metrics"]["heldout_micro_f1"] != load_manifest(ref)["heldout_micro_f1"]  # scored on the scrambled labels


@pytest.mark.slow
def test_a_killed_driver_resumes_without_retraining_and_matches_an_uninterrupted_run(trained, tmp_path):
    """SIGKILL the driver (and its Ray) mid-train, right after the best epoch; the same command again
    skips the finished fold, resumes the interrupted one from its last checkpoint, and ends with the
    same weights and held-out score as the trained fixture's run, which was never interrupted (CPU
    training with fixed seeds is deterministic): the best epoch's weights come back from Ray's copy,
    the killed process's HF folder being gone."""
    from conftest import kill_with_its_ray, setup_run
    from nikl_ray.stages import train

    config = _fixture_neox_only(trained, tmp_path)
    exp, data = setup_run(yaml.safe_load(config.read_text()))
    pair, ref = exp.layout.pair, trained[0].layout.pair
    shutil.copytree(ref("neox-lora", 0), pair("neox-lora", 0))  # fold 0 is done: only fold 1 runs
    reference = load_manifest(ref("neox-lora", 1))
    assert reference["best_epoch"] < reference["epochs_run"], reference  # an epoch after the best is left to resume
    cmd = [sys.executable, "-m", "nikl_ray.cli", "train", "--config", str(config), "--local", "--num-cpus", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and registered_epoch(pair("neox-lora", 1)) < reference["best_epoch"]:
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
    finally:
        kill_with_its_ray(proc)  # the driver and the Ray instance it started
    assert registered_epoch(pair("neox-lora", 1)) < reference["epochs_run"], "killed after the last epoch"
    fold0 = (pair("neox-lora", 0) / "manifest.json").read_text()

    status = {r["fold"]: r["status"] for r in csv.DictReader(open(train.run(exp, data)))}
    assert status == {"0": "skipped (done)", "1": "trained"}
    assert (pair("neox-lora", 0) / "manifest.json").read_text() == fold0
    after = load_manifest(pair("neox-lora", 1))
    assert resumed(read_history(_checkpoints(pair("neox-lora", 1))[-1])), "fold 1 started over instead of resuming"
    _same_adapter(pair("neox-lora", 1) / after["best_checkpoint"], ref("neox-lora", 1) / reference["best_checkpoint"])
    assert after["heldout_micro_f1"] == pytest.approx(reference["heldout_micro_f1"], abs=1e-6)


@pytest.mark.slow
def test_a_run_whose_driving_task_dies_gives_its_share_of_the_cluster_back(trained, tmp_path):
    """The task driving a Train run is killed mid-run, and its controller with it: the stage's
    placement-group guardian (one actor for all runs, in place of Ray Train's detached cleaner per
    run) removes the run's placement group, so the CPU it held is free for the runs after it. While
    it runs, its actors have the project's environment without runtime envs of their own."""
    import psutil
    import ray
    from ray.util.state import list_actors, list_placement_groups

    from nikl_ray.cluster import RAY_ENV, api_server
    from nikl_ray.folds import fold_positions
    from nikl_ray.launcher import fit_run, start_guardian
    from nikl_ray.placement import Placement
    from nikl_ray.runspec import Device, RowsPayload, fold_run

    exp, data, _ = trained
    guardian = start_guardian()
    run = fold_run(exp, exp.backbone("neox-lora"), 0, fold_positions(data.rows, data.folds(exp), 0), RowsPayload.of(data.rows),
                   Placement("neox-lora", 0.1, 0, 0.0, 1.0), Device(False, "cpu"), name="orphan", storage=str(tmp_path))
    total = ray.cluster_resources()["CPU"]
    pending = ray.remote(num_cpus=0)(fit_run).remote(run)
    deadline = time.time() + 120
    while time.time() < deadline and not list_actors(address=api_server(), filters=[("class_name", "=", "RayTrainWorker"),
                                                                                     ("state", "=", "ALIVE")]):
        time.sleep(0.2)
    assert ray.get(guardian.watching.remote()), "the run's controller never reached the guardian"
    cleaners = list_actors(address=api_server(), filters=[("class_name", "=", "PlacementGroupCleaner"), ("state", "=", "ALIVE")])
    assert not cleaners, cleaners  # no process of its own per run
    # its controller and worker have no runtime env of their own (their processes start without
    # waiting for Ray's runtime-env agent), and still the project's environment
    watched = ray.get(guardian.watching.remote())
    held = {g.placement_group_id for g in list_placement_groups(address=api_server(), filters=[("state", "=", "CREATED")])}
    alive = list_actors(address=api_server(), filters=[("state", "=", "ALIVE")], detail=True)
    run_actors = [a for a in alive if a.actor_id in watched or (a.class_name == "RayTrainWorker" and a.placement_group_id in held)]
    assert sorted(a.class_name for a in run_actors) == ["RayTrainWorker", "TrainController"], alive
    for actor in run_actors:
        assert actor.serialized_runtime_env in ("", "{}"), actor
        env = psutil.Process(actor.pid).environ()
        assert all(env.get(k) == os.environ[k] for k in RAY_ENV), (actor.class_name, {k: env.get(k) for k in RAY_ENV})
    assert ray.available_resources().get("CPU", 0) <= total - 1
    ray.cancel(pending, force=True)  # kills the process running fit_run
    deadline = time.time() + 60
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < total:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == total, ray.available_resources()
    assert not ray.get(guardian.watching.remote())


@pytest.mark.slow
def test_the_guardian_removes_every_placement_group_a_dead_controller_created(ray_local):
    """A controller killed with its owner can start a new worker group while its process drains,
    after Ray reports it dead (a leak seen in CI): the guardian removes every placement group the
    controller created, including those it was never told of."""
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import placement_group

    from nikl_ray.launcher import start_guardian

    @ray.remote(num_cpus=0)
    class Controller:
        def __init__(self):
            self.groups = []

        def actor_id(self):
            return ray.get_runtime_context().get_actor_id()

        def start_worker_group(self):
            self.groups.append(placement_group([{"CPU": 0.25}]))
            ray.get(self.groups[-1].ready())
            return self.groups[-1].id.hex()

    guardian = start_guardian()
    controller = Controller.remote()
    first = ray.get(controller.start_worker_group.remote())
    controller_id = ray.get(controller.actor_id.remote())
    ray.get(guardian.watch.remote(controller_id, controller))
    second = ray.get(controller.start_worker_group.remote())  # made after the guardian was told of the run
    ray.kill(controller)
    deadline = time.time() + 30
    while time.time() < deadline and any(placement_group_table()[g]["state"] != "REMOVED" for g in (first, second)):
        time.sleep(0.2)
    assert all(placement_group_table()[g]["state"] == "REMOVED" for g in (first, second)), placement_group_table()
    assert controller_id not in ray.get(guardian.watching.remote())
