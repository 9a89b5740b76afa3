"""Real Ray Train runs of tiny backbones on the demo data (a local 2-CPU Ray instance)."""

import csv

import pytest

from nikl_ray.artifacts import load_manifest
from nikl_ray.runspec import SELECT_METRIC
from nikl_ray.worker import read_history

pytestmark = pytest.mark.slow


def test_every_backbone_and_fold_trains_and_reports_selection_and_held_out_scores(trained):
    exp, _, summary = trained
    table = list(csv.DictReader(open(summary)))
    assert [(r["backbone"], r["fold"]) for r in table] == [(b, f) for b in ("enc-full", "neox-lora", "neox-qlora") for f in "01"]
    assert all(r["status"].startswith("trained") for r in table)
    assert {"selection score", "held-out micro_f1"} <= set(table[0])
    for spec in exp.backbones:
        for fold in range(2):
            pair = exp.layout.pair(spec.name, fold)
            m = load_manifest(pair)
            assert 1 <= m["epochs_run"] <= spec.epochs and 0 <= m["heldout_micro_f1"] <= 1
            best = pair / m["best_checkpoint"]
            weights = "adapter_model.safetensors" if spec.uses_lora else "model.safetensors"
            assert (best / weights).exists()  # LoRA modes keep adapters only
            assert not (best / "model.safetensors").exists() or not spec.uses_lora
            # every epoch logged its clock before its checkpoint was written, so the time in the
            # training function a manifest reports is that of its own last epoch
            history = read_history(best.parent)
            assert len([h for h in history if "train_fn_seconds" in h]) == len([h for h in history if SELECT_METRIC in h])


def test_training_loss_goes_down_on_a_learnable_task(trained):
    exp = trained[0]
    for fold in range(2):
        m = load_manifest(exp.layout.pair("neox-lora", fold))
        losses = m["train_losses"]
        assert len(losses) >= 4 and losses[-1] < losses[0] * 0.8, losses
        assert m["heldout_micro_f1"] > 0.2 and not m["degenerate"]  # the held-out fold was learned, not just the loss


def test_a_second_call_skips_finished_pairs(trained):
    from nikl_ray.stages import train

    exp, data, _ = trained
    before = {(b.name, f): load_manifest(exp.layout.pair(b.name, f))["files"] for b in exp.backbones for f in range(2)}
    table = list(csv.DictReader(open(train.run(exp, data))))
    assert all(r["status"].startswith("skipped (done)") for r in table)
    assert before == {(b.name, f): load_manifest(exp.layout.pair(b.name, f))["files"] for b in exp.backbones for f in range(2)}


def test_the_dashboard_lists_every_fold_run_by_its_name(trained):
    """The dashboard's Train page (its Train API, asked with the cluster's token) knows every
    fold × backbone run as `<backbone>-fold<k>`, finished."""
    from nikl_ray.cluster import api_server
    from nikl_ray.status import train_runs

    exp = trained[0]
    runs = {r["name"]: r for r in train_runs(api_server())}
    for spec in exp.backbones:
        for fold in range(2):
            name = exp.layout.run_name(spec.name, fold)
            assert runs[name]["status"] == "FINISHED", (name, runs.get(name))
            assert runs[name]["attempts"][-1]["workers"], runs[name]
