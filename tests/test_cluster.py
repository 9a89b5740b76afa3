"""A simulated GPU cluster on this CPU: Ray offers two cards that are not there, the placement plan
packs trials onto them as it would onto real cards, and what fits no card is refused up front."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_DIR, RayCluster

pytestmark = pytest.mark.slow


def _config(tmp_path, tiny_backbones, results: str, *extra) -> Path:
    # Per trial, A ≈ its tiny estimate + 1.25 GB of CUDA context → 2 per 2.7 GB card (share 0.5); B
    # is planned as a 50M-parameter model in full fine-tuning → 1 per card (share 1).
    neox = {"checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora", "epochs": 1, "lr": 5e-3, "batch_size": 16,
            "max_length": 40}
    cfg = {"task": "nikl-emotion", "train": str(DEMO_DIR / "train.jsonl"), "results": str(tmp_path / results),
           "folds": {"k": 2, "seed": 0}, "classical": False,
           "resources": {"card_gb": 2.7, "cpus_per_trial": 0.5},
           "backbones": [{"name": "a", **neox}, {"name": "b", **neox, "mode": "full", "params": 5e7}, *extra]}
    path = tmp_path / f"exp{len(extra)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config) -> list[str]:
    return [sys.executable, "-m", "nikl_ray.cli", "train", "--config", str(config)]


def test_trials_pack_k_per_simulated_card_and_what_fits_no_card_is_refused(tmp_path, tiny_backbones):
    cluster = RayCluster("cards")
    cluster.start_head(cpus=2, gpus=2)
    try:
        huge = {"name": "huge", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "full", "params": 3e8}
        # two drivers at once, each with a results root of its own
        env = {"RAY_ADDRESS": cluster.address}
        refusing, training = (cluster.start(*_train(_config(tmp_path, tiny_backbones, "refused", huge)), env=env),
                              cluster.start(*_train(_config(tmp_path, tiny_backbones, "res")), env=env))
        refused, out = refusing.wait(), training.wait()
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "backbone huge" in refused.stderr and "does not fit a 2.7 GB card budget" in refused.stderr
        assert "cards found: 2 × no CUDA device (memory unknown)" in refused.stderr
        assert not (tmp_path / "refused" / "train").exists()  # refused before anything started

        assert out.returncode == 0, out.stderr[-3000:]
        assert "a " in out.stderr and "2 trial(s) per card (GPU share 0.500" in out.stderr, out.stderr[-3000:]
        assert "1 trial(s) per card (GPU share 1.000" in out.stderr
    finally:
        cluster.stop()
    share = {"a": 0.5, "b": 1.0}
    runs = []
    for final in (tmp_path / "res" / "train").glob("*/final.json"):
        f = json.loads(final.read_text())
        runs.append((final.parent.name.split("-")[0], f["gpu_ids"], f["clock"]["fn_start"], f["clock"]["fn_end"]))
    assert len(runs) == 4 and all(len(cards) == 1 for _, cards, _, _ in runs), runs
    # at every moment a run started, the shares running on each card add up to at most one card
    most = {}
    for _, _, t, _ in runs:
        for card in {c[0] for _, c, _, _ in runs}:
            load = sum(share[b] for b, c, s, e in runs if c[0] == card and s <= t < e)
            assert load <= 1.0, (card, t, runs)
            most[card] = max(most.get(card, 0), sum(1 for b, c, s, e in runs if c[0] == card and s <= t < e and b == "a"))
    assert max(most.values()) == 2, runs  # two a's at once on one card: k = 2 per card, never 3
