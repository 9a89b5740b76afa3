"""The Ray Train worker: one backbone trained on one fold with HF Trainer.

It trains on the fold's training rows, evaluates the fold's *selection slice* after every epoch
(micro-F1 or accuracy, per-label F1, loss), keeps the best epoch there (early stopping), and
reports metrics and checkpoints to Ray through Ray's own `RayTrainReportCallback`. The held-out
fold is predicted once at the end, for the train table only: it never chooses anything. A final
run also writes, from that pass and one over its assigned test rows, the features the features
stage would otherwise load the fold model again to compute (runspec.FeatureOrder). A model
whose predictions are constant, or no better than always predicting the majority, is flagged
`degenerate` (judged on the selection slice).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from nikl_ray.backbones import BackboneSpec, quiet_transformers
from nikl_ray.runspec import CHECKPOINT_RANK, HF_CHECKPOINT, MADE, SELECT_METRIC, FoldRun

FINAL = "final.json"  # what a run says after training: held-out scores, degeneracy, time in the function

log = logging.getLogger(__name__)


def loss_function(kind: str, multi_label: bool):
    """The training loss for HF Trainer's `compute_loss_func`: bce (multi-label), asl (asymmetric loss,
    Ridnik et al. 2021: down-weights easy negatives; multi-label) or ce (single-label); auto picks.

    Each is a sum over label entries divided by HF's `num_items_in_batch`: the label entries of
    all micro-batches accumulated into one optimizer step (HF then does not divide by the
    accumulation steps). So B × G accumulation gives exactly the gradient of one batch of B·G —
    which the models' built-in losses do not (they average per micro-batch and are not divided:
    G times too large). ASL is written here because neither transformers nor torch ships it.
    """
    kind = ("bce" if multi_label else "ce") if kind == "auto" else kind

    def loss(outputs, labels, num_items_in_batch=None):
        import torch
        import torch.nn.functional as F

        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs.logits).float()
        if kind == "ce":
            total = F.cross_entropy(logits, labels.long(), reduction="sum")
        elif kind == "bce":
            total = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        else:
            gamma_neg, gamma_pos, clip = 4.0, 0.0, 0.05
            p = torch.sigmoid(logits)
            p_neg = (p - clip).clamp(min=0)
            y = labels.float()
            loss_pos = y * torch.log(p.clamp(min=1e-8)) * (1 - p) ** gamma_pos
            loss_neg = (1 - y) * torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg ** gamma_neg
            total = -(loss_pos + loss_neg).sum()
        return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())

    loss.kind = kind
    return loss


# ---------------------------------------------------------------------------- out of memory
def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def oom_message(spec: BackboneSpec, fold, estimate_gb, batch_size: int) -> str:
    est = f"{estimate_gb:.1f} GB" if estimate_gb is not None else "unknown"
    return (f"backbone {spec.name} fold {fold} ran out of memory at batch size {batch_size} "
            f"(placement estimate {est}, mode {spec.mode}, max_length {spec.max_length}). "
            "Set `oom_retry: true` on the backbone to retry at half the batch size with twice the gradient "
            "accumulation (same effective batch), or lower batch_size / max_length, or set resources.card_gb "
            "below the card so fewer trials share it.")


def run_with_oom_retry(spec: BackboneSpec, fold, estimate_gb, model, fit, reload_model):
    """fit(spec, model); on out-of-memory, halve the batch (doubling accumulation) if the spec allows it."""
    import torch

    while True:
        try:
            return fit(spec, model)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is an OOM we may retry
            if not is_oom(e):
                raise
            if not spec.oom_retry or spec.batch_size == 1:
                raise RuntimeError(oom_message(spec, fold, estimate_gb, spec.batch_size)) from e
            spec = spec.model_copy(update={"batch_size": spec.batch_size // 2, "grad_accum": spec.grad_accum * 2})
            log.warning("%s Retrying at batch size %d × %d accumulation steps.",
                        oom_message(spec, fold, estimate_gb, spec.batch_size * 2), spec.batch_size, spec.grad_accum)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            model = reload_model()


# ---------------------------------------------------------------------------- degenerate models
MARGIN = 0.01  # a model must beat always-the-majority by a point to count as alive


def degenerate_reason(y_true: np.ndarray, probs: np.ndarray, train_labels: np.ndarray, multi_label: bool) -> str | None:
    """Why a fold model's held-out predictions are worthless, or None: probabilities (nearly) the
    same for every row, or no threshold (argmax for single-label) that beats always predicting the
    training rows' most frequent label set by MARGIN."""
    from nikl_ray.decision import decide, fit_rule
    from nikl_ray.metrics import metric_name, primary_score

    if len(probs) > 1 and float(np.asarray(probs).std(0).max()) < 1e-3:
        return "constant predictions (the same probabilities for every row)"
    rule = "global_threshold" if multi_label else "argmax"
    score = primary_score(y_true, decide(probs, rule, fit_rule(probs, y_true, rule)), multi_label)
    sets, counts = np.unique(train_labels.astype(bool), axis=0, return_counts=True)
    majority = np.repeat(sets[counts.argmax()][None], len(y_true), axis=0)
    baseline = primary_score(y_true, majority, multi_label)
    if score < baseline + MARGIN:
        return (f"{metric_name(multi_label)} {score:.4f} at best is no better than always predicting the majority "
                f"label set {np.flatnonzero(majority[0]).tolist()} ({baseline:.4f})")
    return None


def plain_decisions(probs: np.ndarray, multi_label: bool) -> np.ndarray:
    """A lone fold model's decisions, no rule fitted: each label at 0.5, or the likeliest label."""
    from nikl_ray.decision import decide

    return decide(probs, "threshold_0.5" if multi_label else "argmax")


# ---------------------------------------------------------------------------- the worker
def read_history(checkpoint_dir: str | Path) -> list[dict]:
    """The HF log history saved in a Ray checkpoint (per-epoch train loss and eval metrics)."""
    state = Path(checkpoint_dir) / HF_CHECKPOINT / "trainer_state.json"
    return json.loads(state.read_text())["log_history"]


def quiet_worker(needs_bitsandbytes: bool) -> None:
    """Before the heavy imports of a Train worker (its own process): drop warnings a user cannot act on
    (quiet_transformers), and bitsandbytes where the run does not quantize: peft imports it eagerly
    (2–4 s, most of it torch.compile machinery).
    """
    import sys

    if not needs_bitsandbytes and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # peft and transformers then see it as not installed
    quiet_transformers()


def in_ray_train() -> bool:
    import ray.train

    try:
        ray.train.get_context()
    except RuntimeError:
        return False
    return True


def train_fold(config: dict) -> None:
    """The Ray Train loop: `config["run"]` is the FoldRun to train. Outside Ray Train (a plain process,
    as `benchmarks/gpu_packing.py --no-ray` runs it) the same training runs without Ray's reports."""
    started = time.time()  # everything from here (imports included) counts as time in the function
    quiet_worker(config["run"].backbone.mode == "qlora")
    # Ray's per-report lines go to its log files only (one of its loggers is named by file path,
    # so it reaches the console through the root logger); the Progress callback prints each epoch
    for name in ("ray.train", None):
        logging.getLogger(name).setLevel(logging.WARNING)
    import functools

    import ray
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import (DataCollatorWithPadding, EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)

    from nikl_ray.backbones import load_for_classification, load_tokenizer
    from nikl_ray.encode import to_dataset
    from nikl_ray.members import embed
    from nikl_ray.decision import selection_score
    from nikl_ray.metrics import scores, to_probs

    run: FoldRun = config["run"]
    spec, task = run.backbone, run.task
    data = ray.get(run.data) if isinstance(run.data, ray.ObjectRef) else run.data
    set_seed(spec.seed)
    on_cuda = run.device == "cuda" and torch.cuda.is_available()
    if on_cuda and run.memory_fraction:
        # Ray's fractional GPU only schedules; this is what keeps the trial inside its share.
        torch.cuda.set_per_process_memory_fraction(run.memory_fraction)

    clock = {"fn_start": started}
    tokenizer = load_tokenizer(spec)

    def load():
        model = load_for_classification(spec, len(task.labels), task.multi_label, tokenizer, precision=run.precision,
                                        gradient_checkpointing=run.gradient_checkpointing)
        if spec.uses_adapter:
            # Every new (marker) embedding row is a trainable token (LoRA) or the mean init transformers
            # gives it on every load (prompt): the resized embedding matrix need not be saved.
            model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
        return model

    make = lambda idx: to_dataset(tokenizer, spec, data.inputs.take(idx), data.labels[idx], task.multi_label)  # noqa: E731
    train_ds = make(run.train_idx)
    select_ds = make(run.select_idx) if len(run.select_idx) else None

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        y = pred.label_ids if task.multi_label else np.eye(len(task.labels))[pred.label_ids.astype(int)]
        probs = to_probs(logits.astype(np.float64), task.multi_label)
        out = scores(y, plain_decisions(probs, task.multi_label), task.labels, task.multi_label)
        out["score"] = selection_score(probs, y, task.multi_label)
        return out

    class ResourceLog(TrainerCallback):
        """Adds time-in-function, peak device memory and the step this process started from (0, or
        the step of the checkpoint it resumed) to the log after each epoch: before the epoch's
        checkpoint is written, so each checkpoint holds its own entry."""

        start_step = 0

        def on_train_begin(self, args, state, control, **kw):
            self.start_step = state.global_step  # HF has restored the checkpoint's state by now

        def on_epoch_end(self, args, state, control, **kw):
            extra = {"train_fn_seconds": time.time() - started, "resumed_from_step": self.start_step}
            if on_cuda:
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

        def on_train_begin(self, args, state, control, **kw):
            if not (checkpoint and state.best_global_step):
                return
            # the restored state's best step is at most the resumed step: none of this attempt's reports has it
            kept = [c.checkpoint.path for c in ray.train.get_all_reported_checkpoints()
                    if c.metrics.get("step") == state.best_global_step]
            if kept:
                state.best_model_checkpoint = os.path.join(kept[-1], HF_CHECKPOINT)
            else:
                log.warning("%s: Ray holds no checkpoint of the best epoch (step %d): the run ends on the last "
                            "epoch's weights", run.name, state.best_global_step)
                state.best_model_checkpoint = None

    class Progress(TrainerCallback):
        """One line per epoch (in the driver's console through Ray): loss and selection score."""

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if SELECT_METRIC in logs or ("loss" in logs and not select):
                scored = [h[SELECT_METRIC] for h in state.log_history if SELECT_METRIC in h]
                loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), float("nan"))
                where = (f", selection score {scored[-1]:.4f} (best {max(scored):.4f})" if scored else "")
                print(f"{run.name} epoch {round(state.epoch or 0)}/{args.num_train_epochs:g}: train loss {loss:.4f}{where}",
                      flush=True)

    select = select_ds is not None

    # transformers renamed gradient_checkpointing (the old name warns in 5.2x; 5.17 knows only it)
    checkpointing_arg = ("activation_checkpointing" if "activation_checkpointing"
                         in {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing")

    fits = []  # one entry per attempt (run_with_oom_retry): its spec

    def build_trainer(spec: BackboneSpec, model):
        args = TrainingArguments(
            # a folder per attempt: Ray's callback copies the highest-numbered checkpoint in it, which
            # must not be one an earlier (out-of-memory) attempt left
            output_dir=os.path.join(out_dir, f"attempt{len(fits)}"), num_train_epochs=spec.epochs,
            learning_rate=spec.lr, weight_decay=spec.weight_decay,
            warmup_steps=spec.warmup_ratio, per_device_train_batch_size=spec.batch_size,
            per_device_eval_batch_size=spec.batch_size * 2, gradient_accumulation_steps=spec.grad_accum,
            eval_strategy="epoch" if select else "no", save_strategy="epoch", logging_strategy="epoch",
            load_best_model_at_end=select, metric_for_best_model="score" if select else None, greater_is_better=True,
            save_total_limit=2, seed=spec.seed, data_seed=spec.seed, report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=not on_cuda, fp16=on_cuda and run.precision == "fp16",
            bf16=on_cuda and run.precision == "bf16", **{checkpointing_arg: run.gradient_checkpointing})
        callbacks = [ResourceLog(), Progress()] + ([RayTrainReportCallback()] if ray_train else [])
        if select:
            callbacks[:0] = [EarlyStoppingCallback(spec.early_stopping_patience), RankForRay(), BestKeptByRay()]
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=select_ds,
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          compute_metrics=compute_metrics, callbacks=callbacks,
                          compute_loss_func=loss_function(spec.loss, task.multi_label))
        trainer.remove_callback(PrinterCallback)  # its raw dict per log line; Progress says it once
        return trainer

    ray_train = in_ray_train()
    checkpoint = ray.train.get_checkpoint() if ray_train else None
    if checkpoint:
        # Tell whoever listens now the epochs the run already has (a Tune trial restarted with a
        # killed search hears only from here on; a run restored after its last epoch reports nothing new).
        with checkpoint.as_directory() as ckpt_dir:
            for entry in read_history(ckpt_dir):
                if SELECT_METRIC in entry:
                    ray.train.report(entry)

    def fit(spec: BackboneSpec, model):
        fits.append(spec)
        trainer = build_trainer(spec, model)
        if checkpoint:  # restarted after a failure or a killed driver: continue mid-run
            with checkpoint.as_directory() as ckpt_dir:
                trainer.train(resume_from_checkpoint=os.path.join(ckpt_dir, HF_CHECKPOINT))
        else:
            trainer.train()
        return trainer

    model = load()
    clock["model_loaded"] = time.time()
    # HF Trainer's output_dir, gone once training ends: Ray copied each epoch's checkpoint into the run's storage
    with tempfile.TemporaryDirectory(prefix="nikl-ray-hf-", ignore_cleanup_errors=True) as out_dir:
        trainer = run_with_oom_retry(spec, run.fold, run.estimate_gb, model, fit, load)
    clock["trained"] = time.time()
    speed = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
    final = {"train_steps_per_second": speed.get("train_steps_per_second"),
             "train_samples_per_second": speed.get("train_samples_per_second"),
             "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if on_cuda else None}
    if run.predict_heldout:
        # one pass over the held-out rows serves the table and, in a final run, the features stage
        trainer.optimizer = trainer.lr_scheduler = None
        trainer.accelerator.free_memory()  # the optimizer's state (accelerate holds it too) and cached blocks
        # without the mixed-precision wrapper: the model runs as a loaded fold model does (load_trained)
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
        batch = trainer.args.per_device_eval_batch_size
        held = embed(spec, tokenizer, model, data.inputs.take(run.heldout_idx), task.multi_label, batch_size=batch)
        final.update(heldout_report(held[1], data, run))
        # Which weights are in hand is certain only for one uninterrupted attempt: a resumed run has its
        # best epoch's only if Ray still held them (BestKeptByRay), and an OOM retry's Ray run holds the
        # first attempt's checkpoints too. Otherwise the features stage computes them.
        if run.features is not None and not checkpoint and len(fits) == 1:
            write_features(run, data, spec, tokenizer, model, held, weights_step(trainer, select), batch)
    clock["fn_end"] = time.time()
    final.update(train_fn_seconds=clock["fn_end"] - started, clock=clock, pid=os.getpid(),
                 node=ray.get_runtime_context().get_node_id() if ray_train else None,
                 gpu_ids=ray.get_runtime_context().get_accelerator_ids().get("GPU", []) if ray_train else [])
    # beside the run's checkpoints (Ray keeps only reports that carry a checkpoint in its result)
    from nikl_ray.artifacts import write_json

    write_json(Path(run.storage) / run.name / FINAL, final)


def heldout_report(probs: np.ndarray, data, run: FoldRun) -> dict:
    """The held-out fold, once, for the table and the degenerate check: it chose no epoch."""
    from nikl_ray.metrics import scores

    task = run.task
    y_held = data.labels[run.heldout_idx]
    out = {f"heldout_{k}": v for k, v in scores(y_held, plain_decisions(probs, task.multi_label), task.labels,
                                                task.multi_label).items()}
    out["degenerate"] = degenerate_reason(y_held, probs, data.labels[run.train_idx], task.multi_label)
    return out


def weights_step(trainer, select: bool) -> int:
    """The step of the weights in the trainer's model: the best epoch's, which HF loaded at the end, when an
    epoch was chosen; else the last."""
    best = trainer.state.best_global_step
    return best if select and best else trainer.state.global_step


def write_features(run: FoldRun, data, spec: BackboneSpec, tokenizer, model, held: tuple, step: int,
                   batch_size: int) -> None:
    """The run's FeatureOrder from the model in hand, in the features stage's format; `held` = the
    held-out rows' (hidden, probs). Out of device memory, it leaves them to the features stage."""
    from nikl_ray.artifacts import write_json
    from nikl_ray.data import TextRows
    from nikl_ray.members import embed, save_features

    order = run.features
    (Path(order.dir) / MADE).unlink(missing_ok=True)  # written last: no stamp on half-written features
    test = data.test.take(order.test_idx) if data.test is not None else TextRows([], [], [])
    try:
        hidden, probs = embed(spec, tokenizer, model, test, run.task.multi_label, batch_size=batch_size)
    except Exception as e:
        if not is_oom(e):
            raise
        logging.getLogger(__name__).warning("%s: out of device memory making its features; the features stage will "
                                            "compute them", run.name)
        return
    save_features(Path(order.dir), {"oof": {"ids": [data.ids[i] for i in run.heldout_idx], "hidden": held[0], "probs": held[1]},
                                    "test": {"ids": [data.test_ids[i] for i in order.test_idx], "hidden": hidden, "probs": probs}})
    write_json(Path(order.dir) / MADE, {"step": step, "test_hash": order.test_hash})
