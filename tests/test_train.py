"""Real Ray Train runs of tiny backbones on the demo data (a local 2-CPU Ray instance)."""

import csv

import pytest

from conftest import DEMO_DIR
from nikl_ray.artifacts import load_manifest
from nikl_ray.config import parse_experiment
from nikl_ray.data import read_rows
from nikl_ray.folds import split_stage
from nikl_ray.train import pair_dir, train_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbones, ray_local):
    """Encoder full, GPT-NeoX LoRA and GPT-NeoX QLoRA, two folds each, trained once for this module."""
    results = tmp_path_factory.mktemp("train_results")
    exp = parse_experiment({
        "task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "results": str(results),
        "folds": {"k": 2, "seed": 0}, "defaults": {"epochs": 3, "batch_size": 16, "max_length": 40},
        "backbones": [
            {"name": "enc-full", "checkpoint": str(tiny_backbones["electra"]), "mode": "full", "lr": 1e-3},
            {"name": "neox-lora", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora", "lr": 5e-3, "lora_r": 8,
             "epochs": 8, "early_stopping_patience": 8},
            {"name": "neox-qlora", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "qlora", "lr": 5e-3, "lora_r": 8,
             "target_encoding": "pair"},
        ]})
    rows = read_rows(exp.train, exp.task)
    folds = split_stage(exp, rows)
    summary = train_stage(exp, rows, folds)
    return exp, rows, folds, summary


def test_every_backbone_and_fold_trains_and_reports_held_out_metrics(trained):
    exp, _, _, summary = trained
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


def test_training_loss_goes_down_on_a_learnable_task(trained):
    exp = trained[0]
    for fold in range(2):
        losses = load_manifest(pair_dir(exp, "neox-lora", fold))["train_losses"]
        assert len(losses) == 8 and losses[-1] < losses[0] * 0.8, losses
    # and the held-out fold was actually learned, not just the loss
    assert load_manifest(pair_dir(exp, "neox-lora", 0))["micro_f1"] > 0.2


def test_a_second_call_skips_finished_pairs(trained):
    exp, rows, folds, _ = trained
    before = {(b.name, f): load_manifest(pair_dir(exp, b.name, f))["files"] for b in exp.backbones for f in range(2)}
    summary = train_stage(exp, rows, folds)
    table = list(csv.DictReader(open(summary)))
    assert all(r["status"] == "skipped (done)" for r in table)
    assert before == {(b.name, f): load_manifest(pair_dir(exp, b.name, f))["files"] for b in exp.backbones for f in range(2)}
