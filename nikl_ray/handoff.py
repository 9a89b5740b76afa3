"""The fold-features hand-off: a final Train run writes its fold model's features while the model is
loaded, and the features stage takes them instead of loading the fold model again.

- the order (`FeatureOrder`, built by `order` for the train and the features stage alike): where
  they go, and which test rows the fold model answers for (its held-out rows are the run's);
- the stamp (`MADE`, written last): the step of the weights that made them, and the test rows' hash;
- writing, on the worker's side (`write`), only with weights whose step is known (`step_in_hand`);
- taking, on the stage's side (`take`), when the stamp's step is the best checkpoint's and the rows
  are the ones asked for. Otherwise a features task computes them from the best checkpoint.

The one rule for which weights are in hand is `step_in_hand`: the stage only compares steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nikl_ray.runspec import FoldRun

log = logging.getLogger(__name__)
MADE = "made.json"  # beside a run's own features: the step of the weights that made them, and the test rows' hash


@dataclass(frozen=True)
class FeatureOrder:
    """The features a final run writes from its model while it is loaded: its held-out rows and the
    test rows at `test_idx`, into `dir`."""

    dir: str
    test_idx: np.ndarray
    test_hash: str | None


def order(layout, backbone: str, fold: int, test_idx: np.ndarray, test_hash: str | None) -> FeatureOrder:
    """The order of a (backbone, fold) pair's final run (runspec.answering_positions gives `test_idx`)."""
    return FeatureOrder(str(layout.run_features(backbone, fold)), test_idx, test_hash)


def step_in_hand(trainer, select: bool, *, resumed: bool, attempts: int) -> int | None:
    """The step of the weights in the trainer's model, or None where it is not certain.

    HF loaded the best epoch's weights at the end when an epoch was chosen (`select`), else the
    model holds the last. That is certain only for one uninterrupted attempt: a resumed run has its
    best epoch's weights only if Ray still held them (train_callbacks.BestKeptByRay), and an out-of-memory
    retry's Ray run holds the first attempt's checkpoints too (Ray's best may be one of those)."""
    if resumed or attempts != 1:
        return None
    best = trainer.state.best_global_step
    return best if select and best else trainer.state.global_step


def write(run: "FoldRun", data, tokenizer, model, held: tuple, step: int, batch_size: int) -> None:
    """The run's order from the model in hand, in the features stage's format; `held` = the held-out
    rows' (hidden, probs), from the pass that scored them. Out of device memory, it leaves them to
    the features stage."""
    from nikl_ray.artifacts import write_json
    from nikl_ray.data import TextRows
    from nikl_ray.members import embed, save_features
    from nikl_ray.placement import is_oom

    order_ = run.features
    (Path(order_.dir) / MADE).unlink(missing_ok=True)  # written last: no stamp on half-written features
    test = data.test.take(order_.test_idx) if data.test is not None else TextRows([], [], [])
    try:
        hidden, probs = embed(run.backbone, tokenizer, model, test, run.task.multi_label, batch_size=batch_size)
    except Exception as e:
        if not is_oom(e):
            raise
        log.warning("%s: out of device memory making its features; the features stage will compute them", run.name)
        return
    save_features(Path(order_.dir), {
        "oof": {"ids": [data.ids[i] for i in run.heldout_idx], "hidden": held[0], "probs": held[1]},
        "test": {"ids": [data.test_ids[i] for i in order_.test_idx], "hidden": hidden, "probs": probs}})
    write_json(Path(order_.dir) / MADE, {"step": step, "test_hash": order_.test_hash})


def take(made: Path, best: Path, oof_ids: list[str], test_ids: list[str], test_hash: str | None,
         read=None) -> dict | None:
    """The features a fold's final run wrote in `made`, when they come from the weights of its best
    checkpoint (`best`, the HF folder) and are of these rows; None otherwise (also when the run wrote
    none: step_in_hand did not know its weights). `read`: their reader (default the features'; a
    generate task's runs write answers, nikl_ray/qa/answers.py)."""
    from nikl_ray.artifacts import read_json
    from nikl_ray.members import read_features
    from nikl_ray.runfiles import trainer_state

    try:
        stamp = read_json(Path(made) / MADE)
        out = (read or read_features)(Path(made))
        best_step = trainer_state(best)["global_step"]
    except (OSError, ValueError, KeyError):
        return None
    if (stamp["step"], stamp["test_hash"], out["oof"]["ids"], out["test"]["ids"]) != (best_step, test_hash, oof_ids, test_ids):
        return None
    return out
