"""Real Ray Train runs of tiny backbones on the demo data (a local 2-CPU Ray instance)."""

import csv
from pathlib import Path

import pytest

from nikl_ray.artifacts import load_manifest, read_json
from nikl_ray.runspec import SELECT_METRIC
from nikl_ray.runfiles import read_history

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
            # the weights kept are the epoch the table names, also among epochs of equal score (enc-full's)
            assert round(read_json(best / "trainer_state.json")["epoch"]) == m["best_epoch"]
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
    fold × backbone run as `<backbone>-fold<k>`, finished; no run started Ray Train's Ray Data
    actor (a DatasetManager process per run, for Ray Datasets the runs do not have)."""
    from ray.util.state import list_actors

    from nikl_ray.cluster import api_server
    from nikl_ray.status import train_runs

    assert not list_actors(address=api_server(), filters=[("class_name", "=", "DatasetManager")])

    exp = trained[0]
    runs = {r["name"]: r for r in train_runs(api_server())}
    for spec in exp.backbones:
        for fold in range(2):
            name = exp.layout.run_name(spec.name, fold)
            assert runs[name]["status"] == "FINISHED", (name, runs.get(name))
            assert runs[name]["attempts"][-1]["workers"], runs[name]


def test_failed_runs_are_each_reported_with_their_own_error_and_the_others_are_not_lost(trained, tmp_path):
    """`launcher.run_all` drives each run from a thread of the stage: a run that fails in its Ray Train
    worker (its checkpoint folder is gone), one that fails before Ray Train starts (its storage is a
    file) and one that trains each reach their own callback, and run_all returns. None leaves HF
    Trainer's own output folder behind."""
    import dataclasses
    import tempfile

    from nikl_ray.folds import fold_positions
    from nikl_ray.launcher import run_all
    from nikl_ray.placement import Placement
    from nikl_ray.runspec import Device, RowsPayload, fold_run

    exp, data, _ = trained
    positions = fold_positions(data.rows, data.folds(exp), 0)
    payload, spec = RowsPayload.of(data.rows), exp.backbone("neox-lora")
    (tmp_path / "a-file").write_text("")

    def run(name, spec=spec, storage=tmp_path / "runs"):
        made = fold_run(exp, spec, 0, positions, payload, Placement(name, None, 0, 0.0, 1.0), Device(False, "cpu"),
                        name=name, storage=str(storage), predict_heldout=False)
        return dataclasses.replace(made, max_failures=0)

    gone = spec.model_copy(update={"checkpoint": str(tmp_path / "no-such-checkpoint"), "epochs": 1})
    runs = [run("no-checkpoint", spec=gone), run("storage-is-a-file", storage=tmp_path / "a-file"),
            run("trains", spec=spec.model_copy(update={"epochs": 1}))]
    hf_dirs = lambda: set(Path(tempfile.gettempdir()).glob("nikl-ray-hf-*"))  # noqa: E731
    before, done, failed = hf_dirs(), {}, {}
    run_all(runs, lambda r: 2, lambda r, out: done.__setitem__(r.name, out), lambda r, e: failed.__setitem__(r.name, str(e)))
    assert set(failed) == {"no-checkpoint", "storage-is-a-file"} and set(done) == {"trains"}, (failed, done)
    assert "no-such-checkpoint" in failed["no-checkpoint"] and "a-file" in failed["storage-is-a-file"], failed
    assert (tmp_path / "runs" / "trains" / "final.json").exists() and done["trains"]["best_checkpoint"]
    assert hf_dirs() <= before
