"""The files a Ray Train run of ours leaves in its storage (`<storage>/<name>/`): Ray's checkpoints,
each holding HF Trainer's checkpoint folder (HF_CHECKPOINT), and FINAL, what the run's function
says at its end. The one reader of HF's trainer state: the stages, the worker resuming, the
features hand-off and `status` all read a checkpoint's history or step here.
"""

from __future__ import annotations

from pathlib import Path

HF_CHECKPOINT = "checkpoint"  # the HF checkpoint folder inside a Ray checkpoint (RayTrainReportCallback)
FINAL = "final.json"  # beside a run's checkpoints: a fold run's held-out scores and clocks, a pretraining run's curve


def trainer_state(hf_checkpoint: str | Path) -> dict:
    """HF Trainer's state saved in an HF checkpoint folder: its step, epoch and log history."""
    from nikl_ray.artifacts import read_json

    return read_json(Path(hf_checkpoint) / "trainer_state.json")


def read_history(checkpoint_dir: str | Path) -> list[dict]:
    """The HF log history saved in a Ray checkpoint (per-epoch train loss and eval metrics)."""
    return trainer_state(Path(checkpoint_dir) / HF_CHECKPOINT)["log_history"]


def final_path(storage: str | Path, name: str) -> Path:
    return Path(storage) / name / FINAL
