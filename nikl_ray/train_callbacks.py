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
    """One line per epoch (in the driver's console through Ray): loss and selection score. Inside an
    epoch, a line at least every `every_s` seconds of training (step, samples/s, recent train loss,
    time left at most: early stopping may end sooner), or, with `bars`, one of Ray's tqdm bars (the
    driver draws it; for a console that is a terminal)."""

    def __init__(self, run_name: str, select: bool, losses, every_s: float = 30.0, bars: bool = False):
        self.run_name, self.select, self.losses, self.every_s, self.bars = run_name, select, losses, every_s, bars
        self.t0 = self.last = self.stepped = 0.0
        self.step0, self.bar = 0, None

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.last = self.stepped = time.time()
        self.step0 = state.global_step
        if self.bars:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(desc=self.run_name, total=state.max_steps, unit="step")
            self.bar.update(state.global_step)

    def on_step_end(self, args, state, control, **kw):
        # the recent loss is read only when shown (each read brings the device's losses to the CPU)
        now = time.time()
        if self.bar is not None:
            if now - self.last >= 1.0:  # as often as tqdm_ray sends a bar to the driver
                self.last, loss = now, self.losses.mean()
                self.bar.set_description(f"{self.run_name} loss {loss:.4f}" if loss is not None else self.run_name)
            self.bar.update(1)
            return
        step_s, self.stepped = now - self.stepped, now
        if now - self.last + step_s < self.every_s:  # a line now when waiting for the next step would be late
            return
        self.last, loss = now, self.losses.mean()
        done, elapsed = state.global_step - self.step0, max(now - self.t0, 1e-9)
        samples = done * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        left = (state.max_steps - state.global_step) * elapsed / max(done, 1)
        print(f"{self.run_name} step {state.global_step}/{state.max_steps} (epoch {state.epoch or 0:.2f}/"
              f"{args.num_train_epochs:g}): {samples / elapsed:.1f} samples/s, train loss "
              f"{loss if loss is not None else float('nan'):.4f}, at most {clock(left)} left", flush=True)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if SELECT_METRIC in logs or ("loss" in logs and not self.select):
            scored = [h[SELECT_METRIC] for h in state.log_history if SELECT_METRIC in h]
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), float("nan"))
            where = (f", selection score {scored[-1]:.4f} (best {max(scored):.4f})" if scored else "")
            print(f"{self.run_name} epoch {round(state.epoch or 0)}/{args.num_train_epochs:g}: train loss {loss:.4f}{where}",
                  flush=True)
            self.last = time.time()


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Track(TrainerCallback):
    """A run's HF logs to its trackers (nikl_ray/tracking.py): the mean train loss of every
    `every` optimizer steps (`losses`), each epoch's losses and selection-slice scores (micro-F1 or
    accuracy, per-label F1, the selection score) as eval/…, HF's end-of-training speeds as its summary.
    Without `losses` the Trainer logs by steps itself (pretraining): its `loss` is the step loss."""

    SKIP = {CHECKPOINT_RANK, "total_flos", "step", "epoch"}

    def __init__(self, tracker, losses=None, every: int = 20):
        self.tracker, self.losses, self.every = tracker, losses, every

    def on_step_end(self, args, state, control, lr_scheduler=None, **kw):
        if self.losses is None or state.global_step % self.every:
            return
        values = {"train/loss": self.losses.mean(), "train/epoch": state.epoch}
        if lr_scheduler is not None:
            values["train/learning_rate"] = lr_scheduler.get_last_lr()[0]
        self.tracker.metrics(values, state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        if "train_runtime" in logs:  # the end of training: its speeds and mean loss
            self.tracker.summary({f"train/{'mean_loss' if k == 'train_loss' else k.removeprefix('train_')}": v
                                  for k, v in logs.items() if k not in self.SKIP}, state.global_step)
            return
        values = {"train/epoch": state.epoch}
        for k, v in logs.items():
            if k in self.SKIP:
                continue
            if k.startswith("eval_"):
                values[f"eval/{k.removeprefix('eval_')}"] = v
            else:
                values[f"train/{'epoch_loss' if k == 'loss' and self.losses is not None else k}"] = v
        self.tracker.metrics(values, state.global_step)
