"""Ray Tune + Optuna over a tiny GPT-NeoX in LoRA mode: search spaces, ASHA, kill and resume, and a
pipeline with a search that does nothing twice."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ALL_TRACKERS, DEMO_DIR, kill_with_its_ray
from nikl_ray.config import ConfigError, load_experiment
from nikl_ray.search_space import load_search_space, memory_corner

REPO = Path(__file__).resolve().parents[1]


def _experiment_file(tmp_path, tiny_backbones, epochs: int = 2, tracking=None, **search) -> Path:
    cfg = {"tracking": tracking, "task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "test": str(DEMO_DIR / "test.jsonl"),
           "results": str(tmp_path / "res"), "folds": {"k": 2, "seed": 0},
           "backbones": [{"name": "neox", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora",
                          "epochs": epochs, "early_stopping_patience": 10, "batch_size": 16, "max_length": 40}],
           "search_spaces": {"neox": str(REPO / "search_spaces" / "tiny_decoder_lora.yaml")},
           "search": search, "ensemble": {"hidden_sizes": [16], "inner_folds": 2, "epochs": 20, "patience": 5}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("space, message", [
    ({"lora_rank": {"choice": [8]}}, "lora_rank: not a searchable"),
    ({"checkpoint": {"choice": ["x"]}}, "checkpoint: not a searchable"),
    ({"lr": {"loguniform": {"low": 0.0, "high": 1e-3}}}, "empty or not positive"),
    ({"lr": {"uniform": {"low": 1e-3, "high": 1e-4}}}, "empty or not positive"),
    ({"lora_r": {"choice": [0, 8]}}, "lora_r: value 0 is invalid"),
    ({"lr": {"normal": [0, 1]}}, "lr: .*normal"),
    ({"lora_r": {"choice": []}}, "non-empty list"),
    ({"lr": {"uniform": {"low": 1e-3}}}, "lr: .*high"),
])
def test_bad_search_spaces_are_refused_with_the_key(tmp_path, tiny_backbones, space, message):
    exp = load_experiment(_experiment_file(tmp_path, tiny_backbones))
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match=message):
        load_search_space(path, exp.backbones[0])


def test_shipped_search_spaces_load_and_a_search_is_planned_at_its_hungriest_corner(tiny_backbones, tmp_path):
    exp = load_experiment(_experiment_file(tmp_path, tiny_backbones))
    for path in (REPO / "search_spaces").glob("*.yaml"):
        assert load_search_space(path, exp.backbones[0])
    corner = memory_corner(exp.backbones[0], load_search_space(REPO / "search_spaces" / "decoder_lora.yaml", exp.backbones[0]))
    assert corner.lora_r == 128 and corner.batch_size == exp.backbones[0].batch_size


def _terminated_in_saved_state(search: Path) -> set[str]:
    """Trial ids the search's own saved state records as finished (what a restore goes by)."""
    done = set()
    for state in search.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (json.JSONDecodeError, KeyError, OSError):
            continue  # being rewritten
        for meta, *_ in trials:
            meta = json.loads(meta) if isinstance(meta, str) else meta
            if meta.get("status") == "TERMINATED":
                done.add(meta["trial_id"])
    return done


def _trial_dirs(search: Path) -> list[Path]:
    return sorted(search.glob("trial_*")) if search.exists() else []


@pytest.mark.slow
def test_a_killed_search_resumes_and_pipeline_with_tune_run_twice_does_its_work_once(tmp_path, tiny_backbones, ray_local,
                                                                                    caplog):
    """`pipeline --tune` killed during its search; run again, it resumes the search (finished trials
    are kept; ASHA stops a trial that trails at its first rung: trials one at a time, so the seeded
    sampler fixes who reaches each rung first, ranked by selection loss), trains with the tuned
    values and submits; run a third time, it finds every stage done and does nothing. Every trial is
    one tracked run, grouped by the search, a resumed one included."""
    import ray

    from nikl_ray import open_run, pipeline
    from nikl_ray.cluster import api_server
    from nikl_ray.status import train_runs

    config = _experiment_file(tmp_path, tiny_backbones, epochs=2, num_samples=3, max_concurrent=1, seed=1,
                              prune_metric="eval_loss", grace_period=1, tracking=ALL_TRACKERS)
    search = tmp_path / "res" / "tune" / "neox" / "search"
    cmd = [sys.executable, "-m", "nikl_ray.cli", "pipeline", "--tune", "--config", str(config), "--local", "--num-cpus", "2"]
    # Tune saves its experiment state at most every 10 s by default: every second here, so the kill
    # comes right after the first trial finishes instead of well into the next one
    log = open(tmp_path / "pipeline.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not _terminated_in_saved_state(search):
            assert proc.poll() is None, ("the search ended before it could be killed:\n"
                                         + (tmp_path / "pipeline.log").read_text()[-3000:])
            time.sleep(0.5)
    finally:
        kill_with_its_ray(proc)  # the driver and the Ray instance it started
    finished_ids = _terminated_in_saved_state(search)
    finished = {d.name: (d / "result.json").read_text() for d in _trial_dirs(search) if d.name.split("_")[1] in finished_ids}
    assert finished and not (search.parent / "manifest.json").exists()

    pipeline(open_run(config), tune_first=True)  # the same command again: the search resumes
    for name, before in finished.items():  # finished trials were not run again
        assert (search / name / "result.json").read_text() == before
    board = list(csv_rows(search.parent / "leaderboard.csv"))
    assert len(board) == 3 and len(_trial_dirs(search)) == 3
    assert all(b["best selection score"] and not b["stopped_early"].startswith("error") for b in board), board
    assert any(b["stopped_early"] == "asha" and int(b["epochs_run"]) == 1 for b in board), board  # pruned at rung 1
    assert any(b["stopped_early"] == "" and int(b["epochs_run"]) == 2 for b in board), board  # not everything stopped
    assert (search.parent / "optuna.db").exists()
    best = yaml.safe_load((search.parent / "best_config.yaml").read_text())
    assert set(best) == {"lora_r", "lr"}
    trained = json.loads((tmp_path / "res" / "train" / "neox-fold0" / "manifest.json").read_text())
    assert trained["inputs"]["backbone"]["lr"] == best["lr"]  # the tuned values were trained
    # the dashboard names each trial's Train run by backbone and sampled values
    names = {r["name"] for r in train_runs(api_server())}
    assert any(n.startswith("neox-lora_r=") and ",lr=" in n for n in names), names
    # one tracked run per trial, under that name, grouped by the search; none left running, not even one
    # of a trial the kill caught starting, before the search's saved state had it (the rerun forgot it)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'res' / 'tracking' / 'mlflow.db'}")
    tracked = client.search_runs([client.get_experiment_by_name("nikl-emotion/tune/neox").experiment_id])
    assert all(r.info.status in ("FINISHED", "KILLED") for r in tracked), {r.info.run_name: r.info.status for r in tracked}
    trial_ids = {d.name.split("_")[1] for d in _trial_dirs(search)}
    trial_runs = sorted(p for p in (search.parent / "train_runs").iterdir() if p.name.rsplit("-", 1)[1] in trial_ids)
    ours = [r for r in tracked if r.info.run_name.rsplit("-", 1)[1] in trial_ids]
    assert sorted(r.info.run_name for r in ours) == [p.name for p in trial_runs] and len(trial_runs) == 3
    assert all(r.data.params.get("lora_r") for r in ours), ours
    status = {r.info.run_name: r.info.status for r in ours}
    for trial in trial_runs:  # W&B writes its offline run file every 15 s: a trial ASHA killed sooner left only its header
        assert list(trial.glob("wandb/offline-run-*/*.wandb")) and list(trial.glob("tensorboard/events.*"))
        if status[trial.name] == "FINISHED":
            assert any(b"nikl-emotion/tune/neox" in f.read_bytes()[:32768] for f in trial.glob("wandb/offline-run-*/*.wandb"))
    # the cluster is whole again: no trial's or run's placement group outlived it
    deadline = time.time() + 15  # (the resource view lags the last tasks by a moment)
    while time.time() < deadline and ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"]:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"], ray.available_resources()

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "res").rglob("manifest.json")}
    t0 = time.time()
    caplog.clear()  # this run's records only
    with caplog.at_level("INFO", logger="nikl_ray"):
        pipeline(open_run(config), tune_first=True)
    assert time.time() - t0 < 60
    assert "tune neox: done already" in caplog.text and "ensemble: done already" in caplog.text
    assert "→ training" not in caplog.text and "→ computing" not in caplog.text
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "res").rglob("manifest.json")}


def csv_rows(path):
    import csv

    return csv.DictReader(open(path))


def test_a_search_whose_every_trial_failed_says_so_by_name(tmp_path):
    from ray.tune import Result

    from nikl_ray.backbones import BackboneSpec
    from nikl_ray.layout import Layout
    from nikl_ray.stages.tune import write_leaderboard

    spec = BackboneSpec(name="neox", checkpoint="tiny:gpt_neox", mode="lora")
    failed = [Result(metrics={}, checkpoint=None, error=RuntimeError("CUDA out of memory"), path=str(tmp_path / f"trial_{i}"))
              for i in range(2)]
    with pytest.raises(RuntimeError, match=r"tune neox: no trial of 2 reported a selection score \(error: RuntimeError\)"):
        write_leaderboard(Layout(tmp_path), spec, ["lr"], failed, "eval_score")
    assert not Layout(tmp_path).best_config("neox").exists() and Layout(tmp_path).leaderboard("neox").exists()


def test_markdown_cells_keep_pipes_and_newlines_inside_their_cell():
    from nikl_ray.tables import markdown

    table = markdown([{"a|b": "x | y", "note": "line one\nline two"}])
    header, _, row = table.splitlines()
    assert header == r"| a\|b | note |" and row == r"| x \| y | line one<br>line two |"
