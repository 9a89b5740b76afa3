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


def _experiment_file(tmp_path, tiny_backbones) -> Path:
    cfg = {"task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "results": str(tmp_path / "res"),
           "folds": {"k": 2, "seed": 0},
           "backbones": [{"name": "neox", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora",
                          "epochs": 4, "early_stopping_patience": 10, "batch_size": 16, "max_length": 40}],
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

    config = _experiment_file(tmp_path, tiny_backbones)
    search = tmp_path / "res" / "tune" / "neox" / "search"
    # ASHA on the held-out loss (always distinct between trials), a rung every epoch from the first:
    # with 4 trials and halving, the worse half is stopped at the first rungs.
    cmd = [sys.executable, "-m", "nikl_ray.cli", "tune", "--config", str(config), "--local", "--num-cpus", "2",
           "--num-samples", "4", "--prune-metric", "eval_loss", "--grace-period", "1", "--seed", "3"]
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
        tune_stage(exp, rows, folds, "neox", num_samples=4)  # never silently starts over
    best_path = tune_stage(exp, rows, folds, "neox", resume=True)

    dirs = _trial_dirs(search)
    assert len(dirs) == 4
    for name, before in finished.items():  # finished trials were not run again
        assert (search / name / "result.json").read_text() == before
    board = list(csv_rows(best_path.parent / "leaderboard.csv"))
    assert len(board) == 4 and {"lora_r", "lr", "best_micro_f1", "epochs_run", "stopped_early"} <= set(board[0])
    assert any(b["stopped_early"] == "asha" for b in board), board
    assert (best_path.parent / "optuna.db").exists()

    best = yaml.safe_load(best_path.read_text())
    assert set(best) == {"lora_r", "lr"}
    spec = load_experiment(config).backbones[0]  # later stages (train) pick the tuned values up
    assert (spec.lora_r, spec.lr) == (best["lora_r"], best["lr"])
    raw = yaml.safe_load(config.read_text())
    raw["backbones"][0]["lora_r"] = 4  # a value the experiment sets itself still wins
    assert parse_experiment(raw, tmp_path).backbones[0].lora_r == 4


def csv_rows(path):
    import csv

    return csv.DictReader(open(path))
