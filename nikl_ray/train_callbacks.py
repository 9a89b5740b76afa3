"""The HF Trainer callbacks of a fold run (worker.FitAttempts adds them), each built from explicit
arguments. Imported by the worker after quiet_worker: transformers comes with them.
"""

from __future__ import annotations

import logging
import os
import time

import ray.train
import torch
from transformers import TrainerCallback

from nikl_ray.runfiles import HF_CHECKPOINT
from nikl_ray.runspec import CHECKPOINT_RANK, SELECT_METRIC

log = logging.getLogger(__name__)


class ResourceLog(TrainerCallback):
    """Adds time-in-function, peak device memory and the step this process started from (0, or
    the step of the checkpoint it resumed) to the log after each epoch: before the epoch's
    checkpoint is written, so each checkpoint holds its own entry."""

    def __init__(self, started: float, on_cuda: bool):
        self.started, self.on_cuda, self.start_step = started, on_cuda, 0

    def on_train_begin(self, args, state, control, **kw):
        self.start_step = state.global_step  # HF has restored the checkpoint's state by now

    def on_epoch_end(self, args, state, control, **kw):
        extra = {"train_fn_seconds": time.time() - self.started, "resumed_from_step": self.start_step}
        if self.on_cuda:
            extra["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        state.log_history.append(extra)


class RankForRay(TrainerCallback):
    """Each evaluated epoch's CHECKPOINT_RANK, so that Ray keeps the checkpoint of HF's best epoch."""

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        score, best = metrics[SELECT_METRIC], state.best_metric  # HF counts this epoch into best_metric after
        state.log_history.append({CHECKPOINT_RANK: score if best is None or score > best else score - 1.0})


class BestKeptByRay(TrainerCallback):
    """A resumed run's HF state names its best epoch's checkpoint in the killed process's temporary
    folder: gone (HF forgets it and would end on the last epoch's weights) or maybe half-deleted.
    Ray holds that epoch's checkpoint (RankForRay): HF loads Ray's copy at the end."""

    def __init__(self, run_name: str, resumed: bool):
        self.run_name, self.resumed = run_name, resumed

    def on_train_begin(self, args, state, control, **kw):
        if not (self.resumed and state.best_global_step):
            return
        # the restored state's best step is at most the resumed step: none of this attempt's reports has it
        kept = [c.checkpoint.path for c in ray.train.get_all_reported_checkpoints()
                if c.metrics.get("step") == state.best_global_step]
        if kept:
            state.best_model_checkpoint = os.path.join(kept[-1], HF_CHECKPOINT)
        else:
            log.warning("%s: Ray holds no checkpoint of the best epoch (step %d): the run ends on the last "
                        "epoch's weights", self.run_name, state.best_global_step)
            state.best_model_checkpoint = None


class Progress(TrainerCallback):
    """One line per epoch (in the driver's console through Ray): loss and selection score."""

    def __init__(self, run_name: str, select: bool):
        self.run_name, self.select = run_name, select

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if SELECT_METRIC in logs or ("loss" in logs and not self.select):
            scored = [h[SELECT_METRIC] for h in state.log_history if SELECT_METRIC in h]
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), float("nan"))
            where = (f", selection score {scored[-1]:.4f} (best {max(scored):.4f})" if scored else "")
            print(f"{self.run_name} epoch {round(state.epoch or 0)}/{args.num_train_epochs:g}: train loss {loss:.4f}{where}",
                  flush=True)
