"""Tracking (nikl_ray/tracking.py) with the real packages, offline: the `trained` fixture's fold runs
and its ensemble read back from TensorBoard's event files, MLflow's store and W&B's run folders;
no credential reaches a file; progress lines inside an epoch."""

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_DIR, FAKE_SECRETS, setup_run
from nikl_ray.config import ConfigError, parse_experiment


def _exp(tracking) -> dict:
    return {"task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "tracking": tracking,
            "backbones": [{"name": "neox", "checkpoint": "tiny:gpt_neox"}]}


@pytest.mark.parametrize("tracking, trackers", [
    (None, ["tensorboard"]), ("none", []), ("mlflow", ["mlflow"]),
    (["tensorboard", "mlflow", {"wandb": {"mode": "offline"}}], ["tensorboard", "mlflow", "wandb"]),
    ({"wandb": {"project": "p"}, "log_every_steps": 5}, ["tensorboard", "wandb"]),
    ({"tensorboard": False, "mlflow": True}, ["mlflow"]),
])
def test_the_tracking_section_takes_a_name_a_list_or_a_mapping(tracking, trackers):
    raw = _exp(tracking)
    if tracking is None:
        del raw["tracking"]
    assert parse_experiment(raw).tracking.trackers == trackers


@pytest.mark.parametrize("tracking, message", [
    (["tensorbord"], "unknown tracker 'tensorbord'"),
    ({"wandb": {"api_key": "abc123secret"}}, "credentials go in environment variables"),
    ({"mlflow": {"tracking_uri": "https://me:abc123secret@mlflow.example"}}, "MLFLOW_TRACKING_TOKEN"),
    ({"wandb": {"mode": "cloud"}}, "tracking.wandb.mode"),
])
def test_a_bad_tracking_section_is_refused_without_echoing_a_secret(tracking, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_experiment(_exp(tracking))
    assert "abc123secret" not in str(e.value)


def _scalars(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_fold_run_and_the_ensemble_are_tracked_by_each_tracker_and_no_secret_reaches_a_file(stacked, cli, tmp_path):
    from mlflow.tracking import MlflowClient

    from nikl_ray.artifacts import load_manifest, read_json

    exp, data, _ = stacked
    layout = exp.layout
    client = MlflowClient(tracking_uri=f"sqlite:///{layout.mlflow_db}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("nikl-emotion").experiment_id])}
    names = [layout.run_name(b.name, f) for b in exp.backbones for f in range(exp.folds.k)]
    # test_distill may have distilled this shared run already: its student runs are tracked too
    students = sorted(p.name for p in (layout.distill / "runs").glob("*")) if (layout.distill / "runs").is_dir() else []
    assert sorted(runs) == sorted(names + ["ensemble"] + students)  # one MLflow run per Train run, as the dashboard names it
    for spec in exp.backbones:
        for fold in range(exp.folds.k):
            name, run_dir = layout.run_name(spec.name, fold), layout.pair(spec.name, fold)
            m = load_manifest(run_dir)
            # TensorBoard: the run's events, one selection score per epoch, per-label F1, the step loss, the end
            scalars = _scalars(run_dir / "tensorboard")
            assert len(scalars["eval/score"]) == m["epochs_run"], (name, scalars["eval/score"])
            assert {"eval/micro_f1", "eval/f1_joy", "eval/loss", "train/epoch_loss"} <= set(scalars)
            assert len(scalars["train/loss"]) >= m["epochs_run"]  # every 5 steps; an epoch is 13
            assert scalars["heldout/micro_f1"][-1][1] == pytest.approx(m["heldout_micro_f1"])
            assert scalars["best/epoch"][-1][1] == m["best_epoch"]
            # MLflow: its parameters and the same metrics
            run = runs[name]
            assert run.info.status == "FINISHED" and run.data.tags["stage"] == "train"
            assert {"backbone": spec.name, "fold": str(fold), "mode": spec.mode, "lr": str(spec.lr),
                    "batch_size": str(spec.batch_size)}.items() <= run.data.params.items()
            if spec.mode != "full":
                assert run.data.params["lora_r"] == str(spec.lora_r)
            assert len(client.get_metric_history(run.info.run_id, "eval/score")) == m["epochs_run"]
            assert run.data.metrics["heldout/micro_f1"] == pytest.approx(m["heldout_micro_f1"])
            # W&B: an offline run folder per fold run, in the run's folder, named and grouped
            (wandb_run,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
            head = wandb_run.read_bytes()[:32768]
            assert name.encode() in head and b"nikl-emotion" in head
            assert read_json(run_dir / "tracking.json") == {"mlflow": run.info.run_id, "wandb": wandb_run.stem[4:]}
    # the ensemble: its candidates table and the submitted choice
    report = read_json(layout.report_json)
    ensemble = runs["ensemble"]
    assert ensemble.data.tags["submitted.name"] == report["chosen"]["name"]
    assert ensemble.data.metrics["submitted.score"] == pytest.approx(report["chosen"]["score"])
    assert [a.path for a in client.list_artifacts(ensemble.info.run_id)] == ["candidates.json"]
    # status says where each run is tracked and how to open it
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "task": "nikl-emotion", "train": [str(p) for p in exp.train], "results": str(layout.root),
        "folds": exp.folds.model_dump(), "tracking": exp.tracking.model_dump(mode="json"),
        "backbones": [{"name": b.name, "checkpoint": b.checkpoint, "mode": b.mode} for b in exp.backbones]}))
    status = json.loads(cli("status", "--config", config, "--json")[1])
    assert status["runs"]["neox-lora-fold0"]["tracking"] == {
        "tensorboard": str(layout.pair("neox-lora", 0) / "tensorboard"), "mlflow_run_id": runs["neox-lora-fold0"].info.run_id,
        "wandb": [str(p) for p in layout.pair("neox-lora", 0).glob("wandb/offline-run-*")],
        "wandb_run_id": read_json(layout.pair("neox-lora", 0) / "tracking.json")["wandb"]}
    code, out, _ = cli("status", "--config", config)
    assert f"tensorboard --logdir {layout.root}" in out and f"mlflow ui --backend-store-uri sqlite:///{layout.mlflow_db}" in out
    assert re.search(rf"W&B offline \({7 + len(students)} run folder\(s\)\): wandb sync", out), out
    # no credential of this session's environment reached a file under the results root
    leaked = [(p, k) for p in layout.root.rglob("*") if p.is_file() for k, v in FAKE_SECRETS.items()
              if v.encode() in p.read_bytes()]
    assert not leaked


def test_a_long_epoch_prints_progress_lines_inside_it(tiny_backbones, tmp_path, capsys):
    """With `progress_seconds` short, the fold run's worker prints step, samples/s, loss and time left
    between its epoch lines (what a CPU epoch of minutes prints every 30 s)."""
    import tempfile

    from nikl_ray.backbones import load_tokenizer
    from nikl_ray.encode import to_dataset
    from nikl_ray.folds import fold_positions
    from nikl_ray.placement import place
    from nikl_ray.runspec import Device, RowsPayload, fold_run
    from nikl_ray.tracking import Tracker, target
    from nikl_ray.worker import FitAttempts, load_model

    exp, data = setup_run({**_exp({"tensorboard": False, "progress_seconds": 0.01}), "results": str(tmp_path / "res"),
                           "folds": {"k": 2, "seed": 0}, "classical": False,
                           "backbones": [{"name": "neox", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora",
                                          "epochs": 2, "batch_size": 16, "max_length": 40}]})
    spec = exp.backbones[0]
    run = fold_run(exp, spec, 0, fold_positions(data.rows, data.folds(exp), 0), RowsPayload.of(data.rows),
                   place("neox", None, budget_gb=None, use_gpu=False), Device(False, "cpu"), name="neox-fold0",
                   storage=str(tmp_path / "runs"), tracking=target(exp, "train"))
    tokenizer = load_tokenizer(spec)
    train = to_dataset(tokenizer, spec, data.rows.inputs().take(run.train_idx), data.rows.labels[run.train_idx], True)
    with tempfile.TemporaryDirectory() as out_dir:
        fit = FitAttempts(run, tokenizer, train, None, out_dir, None, False, False, time.time(), Tracker([]))
        capsys.readouterr()
        fit(spec, load_model(run, tokenizer))
    lines = capsys.readouterr().out.splitlines()
    epoch_lines = [i for i, line in enumerate(lines) if re.match(r"neox-fold0 epoch \d/2: train loss", line)]
    steps = [i for i, line in enumerate(lines)
             if re.match(r"neox-fold0 step \d+/\d+ \(epoch [\d.]+/2\): [\d.]+ samples/s, train loss [\d.]+, at most \d+m\d\ds left",
                         line)]
    assert len(epoch_lines) == 2, lines
    assert sum(i < epoch_lines[0] for i in steps) >= 3 and sum(epoch_lines[0] < i < epoch_lines[1] for i in steps) >= 3, lines


def test_runs_a_kill_left_running_are_marked_killed_even_without_their_ids_file(tmp_path):
    """A trial killed with its driver inside `Tracker.open` made its MLflow run, not its `tracking.json`."""
    from mlflow.tracking import MlflowClient

    from nikl_ray.tracking import Target, mark_killed, mlflow_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = mlflow_experiment(uri, "nikl-emotion/tune/neox", tmp_path / "artifacts")
    ours, theirs = {"results": str(tmp_path / "res")}, {"results": str(tmp_path / "other")}
    target = Target("tune", "nikl-emotion/tune/neox", False, uri, exp_id, None, 20, 60.0, False, ours)
    client = MlflowClient(tracking_uri=uri)
    run = lambda name, tags: client.create_run(exp_id, run_name=name, tags=tags).info.run_id  # noqa: E731
    no_ids, with_ids, finished = run("neox-a", ours), run("neox-b", ours), run("neox-c", ours)
    other_results, not_listed = run("neox-a", theirs), run("neox-d", ours)
    client.set_terminated(finished)
    dirs = [tmp_path / "runs" / n for n in ("neox-a", "neox-b", "neox-c")]
    for d in dirs:
        d.mkdir(parents=True)
    (dirs[1] / "tracking.json").write_text(json.dumps({"mlflow": with_ids}))

    mark_killed(target, dirs)
    status = lambda r: client.get_run(r).info.status  # noqa: E731
    assert [status(r) for r in (no_ids, with_ids, finished)] == ["KILLED", "KILLED", "FINISHED"]
    assert status(other_results) == status(not_listed) == "RUNNING"  # another results folder's, another search's
