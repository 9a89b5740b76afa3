"""Ray Tune + Optuna over a tiny GPT-NeoX in LoRA mode: search, early stopping, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_DIR
from nikl_ray.config import ConfigError, load_experiment, parse_experiment
from nikl_ray.tune import load_search_space

REPO = Path(__file__).resolve().parents[1]


def _experiment_file(tmp_path, tiny_backbones, epochs: int = 4) -> Path:
    cfg = {"task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "results": str(tmp_path / "res"),
           "folds": {"k": 2, "seed": 0},
           "backbones": [{"name": "neox", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora",
                          "epochs": epochs, "early_stopping_patience": 10, "batch_size": 16, "max_length": 40}],
           "search_spaces": {"neox": str(REPO / "search_spaces" / "tiny_decoder_lora.yaml")}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("space, message", [
    ({"lora_rank": {"choice": [8]}}, "lora_rank: not a searchable"),
    ({"checkpoint": {"choice": ["x"]}}, "checkpoint: not a searchable"),
    ({"lr": {"loguniform": {"low": 0.0, "high": 1e-3}}}, "empty or not positive"),
    ({"lr": {"uniform": {"low": 1e-3, "high": 1e-4}}}, "empty or not positive"),
    ({"lora_r": {"choice": [0, 8]}}, "lora_r: value 0 is invalid"),
    ({"lr": {"normal": [0, 1]}}, "expected one of"),
    ({"lora_r": {"choice": []}}, "non-empty list"),
])
def test_bad_search_spaces_are_refused_with_the_key(tmp_path, tiny_backbones, space, message):
    exp = load_experiment(_experiment_file(tmp_path, tiny_backbones))
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match=message):
        load_search_space(path, exp.backbones[0])


def test_shipped_search_spaces_load(tiny_backbones, tmp_path):
    exp = load_experiment(_experiment_file(tmp_path, tiny_backbones))
    for path in (REPO / "search_spaces").glob("*.yaml"):
        assert load_search_space(path, exp.backbones[0])


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
    return sorted(search.glob("tune_trial_*")) if search.exists() else []


@pytest.mark.slow
def test_a_killed_search_resumes_without_rerunning_finished_trials(tmp_path, tiny_backbones, ray_local):
    from nikl_ray.folds import split_stage
    from nikl_ray.pipeline import load_inputs
    from nikl_ray.tune import tune_stage

    config = _experiment_file(tmp_path, tiny_backbones, epochs=2)
    search = tmp_path / "res" / "tune" / "neox" / "search"
    cmd = [sys.executable, "-m", "nikl_ray.cli", "tune", "--config", str(config), "--local", "--num-cpus", "2",
           "--num-samples", "3", "--seed", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not _terminated_in_saved_state(search):
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait()
    finished_ids = _terminated_in_saved_state(search)
    finished = {d.name: (d / "result.json").read_text() for d in _trial_dirs(search) if d.name.split("_")[2] in finished_ids}
    assert finished, "no trial finished before the kill"

    exp = load_experiment(config)
    rows, _ = load_inputs(exp)
    folds = split_stage(exp, rows)
    with pytest.raises(ConfigError, match="--resume"):
        tune_stage(exp, rows, folds, "neox", num_samples=3)  # never silently starts over
    best_path = tune_stage(exp, rows, folds, "neox", resume=True)

    dirs = _trial_dirs(search)
    assert len(dirs) == 3
    for name, before in finished.items():  # finished trials were not run again
        assert (search / name / "result.json").read_text() == before
    board = list(csv_rows(best_path.parent / "leaderboard.csv"))
    assert len(board) == 3 and {"lora_r", "lr", "best_micro_f1", "epochs_run", "stopped_early"} <= set(board[0])
    # a trial cut off by the kill is rerun and reports its epochs (a resumed Train run replays the earlier ones)
    assert all(b["best_micro_f1"] != "nan" and int(b["epochs_run"]) >= 1 and not b["stopped_early"].startswith("error")
               for b in board), board
    assert (best_path.parent / "optuna.db").exists()

    best = yaml.safe_load(best_path.read_text())
    assert set(best) == {"lora_r", "lr"}
    spec = load_experiment(config).backbones[0]  # later stages (train) pick the tuned values up
    assert (spec.lora_r, spec.lr) == (best["lora_r"], best["lr"])
    raw = yaml.safe_load(config.read_text())
    raw["backbones"][0]["lora_r"] = 4  # a value the experiment sets itself still wins
    assert parse_experiment(raw, tmp_path).backbones[0].lora_r == 4


def test_a_ray_instance_without_its_dashboard_reports_no_state_api():
    """Ray Train frees a stopped trial's resources only through the state API: without it a search
    would hang once stopped trials hold the cluster, so tune_stage refuses to start on this report."""
    code = ("from nikl_ray.cluster import connect, state_api_problem; connect(local=True, num_cpus=1, dashboard=False); "
            "print('PROBLEM', state_api_problem())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert "PROBLEM this Ray instance was started without its dashboard" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_asha_stops_a_trial_that_trails_at_a_rung(tmp_path, tiny_backbones, ray_local):
    """A schedule built to show pruning: trials one at a time (so the order they reach each rung is
    fixed by the seeded sampler), a rung every epoch, ranked by held-out loss (never tied)."""
    from nikl_ray.folds import split_stage
    from nikl_ray.pipeline import load_inputs
    from nikl_ray.tune import tune_stage

    exp = load_experiment(_experiment_file(tmp_path, tiny_backbones, epochs=2))
    rows, _ = load_inputs(exp)
    best_path = tune_stage(exp, rows, split_stage(exp, rows), "neox", num_samples=4, prune_metric="eval_loss",
                           grace_period=1, seed=3, max_concurrent=1)
    board = list(csv_rows(best_path.parent / "leaderboard.csv"))
    stopped = [b for b in board if b["stopped_early"] == "asha"]
    assert stopped, board
    assert all(int(b["epochs_run"]) == 1 for b in stopped), board  # at the first rung
    assert any(b["stopped_early"] == "" and int(b["epochs_run"]) == 2 for b in board), board  # not everything stopped


def csv_rows(path):
    import csv

    return csv.DictReader(open(path))
