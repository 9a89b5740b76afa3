"""Real Ray Train runs of tiny backbones on the demo data (a local 2-CPU Ray instance)."""

import csv

import pytest

from nikl_ray.artifacts import load_manifest
from nikl_ray.train import METRIC, pair_dir, read_history, train_stage

pytestmark = pytest.mark.slow


def test_every_backbone_and_fold_trains_and_reports_held_out_metrics(trained):
    exp, summary = trained[0], trained[-1]
    table = list(csv.DictReader(open(summary)))
    assert [(r["backbone"], r["fold"]) for r in table] == [(b, f) for b in ("enc-full", "neox-lora", "neox-qlora") for f in "01"]
    assert all(r["status"] == "trained" for r in table)
    for spec in exp.backbones:
        for fold in range(2):
            m = load_manifest(pair_dir(exp, spec.name, fold))
            assert 1 <= m["epochs_run"] <= spec.epochs and 0 <= m["micro_f1"] <= 1
            best = pair_dir(exp, spec.name, fold) / m["best_checkpoint"]
            weights = "adapter_model.safetensors" if spec.uses_lora else "model.safetensors"
            assert (best / weights).exists()  # LoRA modes keep adapters only
            assert not (best / "model.safetensors").exists() or not spec.uses_lora
            # every evaluation logged its clock before its checkpoint was written, so the time in
            # the training function a manifest reports is that of its own last epoch
            history = read_history(best.parent)
            assert len([h for h in history if "train_fn_seconds" in h]) == len([h for h in history if METRIC in h])


def test_training_loss_goes_down_on_a_learnable_task(trained):
    exp = trained[0]
    for fold in range(2):
        losses = load_manifest(pair_dir(exp, "neox-lora", fold))["train_losses"]
        assert len(losses) == 8 and losses[-1] < losses[0] * 0.8, losses
    # and the held-out fold was actually learned, not just the loss
    assert load_manifest(pair_dir(exp, "neox-lora", 0))["micro_f1"] > 0.2


def test_a_second_call_skips_finished_pairs(trained):
    exp, rows, folds = trained[:3]
    before = {(b.name, f): load_manifest(pair_dir(exp, b.name, f))["files"] for b in exp.backbones for f in range(2)}
    summary = train_stage(exp, rows, folds)
    table = list(csv.DictReader(open(summary)))
    assert all(r["status"] == "skipped (done)" for r in table)
    assert before == {(b.name, f): load_manifest(pair_dir(exp, b.name, f))["files"] for b in exp.backbones for f in range(2)}
