"""The Ray Train worker: one backbone trained on one fold with HF Trainer.

It trains on the fold's training rows, evaluates the fold's *selection slice* after every epoch
(micro-F1 or accuracy, per-label F1, loss), keeps the best epoch there (early stopping), and
reports metrics and checkpoints to Ray through Ray's own `RayTrainReportCallback`. The held-out
fold is predicted once at the end, for the train table only: it never chooses anything. A final
run also writes, from that pass and one over the test rows, the features the features
stage would otherwise load the fold model again to compute (nikl_ray/handoff.py). A model
whose predictions are constant, or no better than always predicting the majority, is flagged
`degenerate` (judged on the held-out fold).

`train_fold` reads top to bottom; what it builds (the training arguments, the trainer, one fit
attempt) is defined below it, and its HF callbacks in nikl_ray/train_callbacks.py, each from
explicit arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import tempfile
import time

import numpy as np

from nikl_ray import handoff
from nikl_ray.backbones import BackboneSpec, quiet_worker
from nikl_ray.modes import mode_of
from nikl_ray.placement import cap_memory, is_oom
from nikl_ray.runfiles import HF_CHECKPOINT, final_path, read_history
from nikl_ray.runspec import SELECT_METRIC, FoldRun, best_evaluated

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
        if kind == "ce" and labels.ndim == 2:  # soft targets (a student's): HF counts B × L label entries
            total = F.cross_entropy(logits, labels.float(), reduction="sum") * labels.shape[1]
        elif kind == "ce":
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
    run: FoldRun = config["run"]
    quiet_worker(mode_of(run.backbone).needs_bitsandbytes)
    # Ray's per-report lines go to its log files only (one of its loggers is named by file path,
    # so it reaches the console through the root logger); the Progress callback prints each epoch
    for name in ("ray.train", None):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray
    import ray.train
    import torch
    from transformers import set_seed

    from nikl_ray.artifacts import write_json
    from nikl_ray.backbones import load_tokenizer
    from nikl_ray.encode import to_dataset
    from nikl_ray.members import embed

    spec, task = run.backbone, run.task
    data = ray.get(run.data) if isinstance(run.data, ray.ObjectRef) else run.data
    set_seed(spec.seed)
    cap_memory(run.memory_fraction, run.device)
    on_cuda = run.device == "cuda" and torch.cuda.is_available()
    ray_train = in_ray_train()
    checkpoint = ray.train.get_checkpoint() if ray_train else None
    if checkpoint:
        report_restored_epochs(checkpoint)
    clock = {"fn_start": started}
    # load: the tokenizer, the fold's rows, the model
    tokenizer = load_tokenizer(spec)
    soft = data.targets is not None
    make = lambda idx, y, soft=False: to_dataset(tokenizer, spec, data.inputs.take(idx), y[idx], task.multi_label, soft)  # noqa: E731
    train_ds = make(run.train_idx, data.targets if soft else data.labels, soft)
    select_ds = make(run.select_idx, data.labels) if len(run.select_idx) else None
    model = load_model(run, tokenizer)
    clock["model_loaded"] = time.time()
    with open_tracker(run) as tracker:
        # fit, retried at half the batch on out-of-memory where the spec allows it; HF Trainer's output
        # folder is gone once training ends: Ray copied each epoch's checkpoint into the run's storage
        with tempfile.TemporaryDirectory(prefix="nikl-ray-hf-", ignore_cleanup_errors=True) as out_dir:
            fit = FitAttempts(run, tokenizer, train_ds, select_ds, out_dir, checkpoint, ray_train, on_cuda, started, tracker)
            trainer = run_with_oom_retry(spec, run.fold, run.estimate_gb, model, fit,
                                         functools.partial(load_model, run, tokenizer))
        clock["trained"] = time.time()
        speed = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
        final = {"train_steps_per_second": speed.get("train_steps_per_second"),
                 "train_samples_per_second": speed.get("train_samples_per_second"),
                 "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if on_cuda else None}
        if run.predict_heldout:
            # one pass over the held-out rows serves the table and, in a final run, the features stage
            model, batch = inference_model(trainer), trainer.args.per_device_eval_batch_size
            held = embed(spec, tokenizer, model, data.inputs.take(run.heldout_idx), task.multi_label, batch_size=batch)
            final.update(heldout_report(held[1], data, run))
            step = handoff.step_in_hand(trainer, select_ds is not None, resumed=bool(checkpoint), attempts=len(fit.specs))
            if run.features is not None and step is not None:
                handoff.write(run, data, tokenizer, model, held, step, batch)
        tracker.summary(end_summary(trainer, final), trainer.state.global_step)
    clock["fn_end"] = time.time()
    context = ray.get_runtime_context() if ray_train else None
    final.update(train_fn_seconds=clock["fn_end"] - started, clock=clock, pid=os.getpid(),
                 node=context.get_node_id() if context else None,
                 gpu_ids=context.get_accelerator_ids().get("GPU", []) if context else [])
    # beside the run's checkpoints (Ray keeps only reports that carry a checkpoint in its result)
    write_json(final_path(run.storage, run.name), final)


# ---------------------------------------------------------------------------- what train_fold builds
def report_restored_epochs(checkpoint) -> None:
    """Tell whoever listens now the epochs the run already has (a Tune trial restarted with a killed
    search hears only from here on; a run restored after its last epoch reports nothing new)."""
    import ray.train

    with checkpoint.as_directory() as ckpt_dir:
        for entry in read_history(ckpt_dir):
            if SELECT_METRIC in entry:
                ray.train.report(entry)


def open_tracker(run: FoldRun):
    """The run's trackers (nikl_ray/tracking.py; a fold run is one worker, rank 0), with its parameters
    logged: what it trains (the backbone spec, sampled values included), on which fold and rows, how."""
    from nikl_ray.tracking import Tracker

    spec = run.backbone.model_dump(mode="json", exclude_none=True)
    params = {"backbone": spec.pop("name"), **spec, "fold": run.fold, "task": run.task.name,
              "train_rows": len(run.train_idx), "selection_rows": len(run.select_idx), "heldout_rows": len(run.heldout_idx),
              "device": run.device, "precision": run.precision}
    return Tracker.open(run.tracking, run.name, os.path.join(run.storage, run.name), params)


def end_summary(trainer, final: dict) -> dict:
    """What a run's trackers keep of its end: the best epoch and its selection score, the held-out scores."""
    best = best_evaluated(trainer.state.log_history)  # as the train table reads it
    out = {"best/epoch": round(best["epoch"] if best else trainer.state.epoch or 0),
           "best/selection_score": best[SELECT_METRIC] if best else None}
    out.update({f"heldout/{k.removeprefix('heldout_')}": v for k, v in final.items() if k.startswith("heldout_")})
    if "degenerate" in final:
        out["degenerate"] = final["degenerate"] or "no"
    return out


def load_model(run: FoldRun, tokenizer):
    """The model to train, for the run's mode, precision and checkpointing."""
    from nikl_ray.backbones import load_for_classification

    spec = run.backbone
    model = load_for_classification(spec, len(run.task.labels), run.task.multi_label, tokenizer, precision=run.precision,
                                    gradient_checkpointing=run.gradient_checkpointing)
    if mode_of(spec).adapter:
        # Every new (marker) embedding row is a trainable token (LoRA) or the mean init transformers
        # gives it on every load (prompt): the resized embedding matrix need not be saved.
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return model


def inference_model(trainer):
    """The trained model for the held-out and test passes, run as a loaded fold model is
    (backbones.load_trained): without accelerate's mixed-precision wrapper, in eval mode, after the
    optimizer's state (accelerate holds it too) and cached blocks are released."""
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.accelerator.free_memory()
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()


def compute_metrics(pred, task) -> dict:
    """HF Trainer's metrics of the selection slice: scores at plain decisions, and the selection score."""
    from nikl_ray.decision import selection_score
    from nikl_ray.metrics import scores, to_probs

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    y = pred.label_ids if task.multi_label else np.eye(len(task.labels))[pred.label_ids.astype(int)]
    probs = to_probs(logits.astype(np.float64), task.multi_label)
    out = scores(y, plain_decisions(probs, task.multi_label), task.labels, task.multi_label)
    out["score"] = selection_score(probs, y, task.multi_label)
    return out


def training_arguments(spec: BackboneSpec, run: FoldRun, output_dir: str, select: bool, on_cuda: bool):
    """HF TrainingArguments of one attempt (`spec` may be an out-of-memory retry's). A generate
    task's evaluation keeps only the loss (its score comes from generated answers, not logits)."""
    from transformers import TrainingArguments

    if spec.optim and spec.optim.startswith("paged") and not on_cuda:
        raise ValueError(f"backbone {spec.name}: optim {spec.optim} (bitsandbytes) needs a GPU; use adamw_torch on CPU")
    # transformers renamed gradient_checkpointing (the old name warns in 5.2x; 5.17 knows only it)
    checkpointing = ("activation_checkpointing" if "activation_checkpointing"
                     in {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing")
    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=spec.epochs, learning_rate=spec.lr, weight_decay=spec.weight_decay,
        warmup_steps=spec.warmup_ratio, per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size * 2, gradient_accumulation_steps=spec.grad_accum,
        eval_strategy="epoch" if select else "no", save_strategy="epoch", logging_strategy="epoch",
        load_best_model_at_end=select, metric_for_best_model="score" if select else None, greater_is_better=True,
        save_total_limit=2, seed=spec.seed, data_seed=spec.seed, report_to="none", disable_tqdm=True,
        prediction_loss_only=run.task.generates, **({"optim": spec.optim} if spec.optim else {}),
        dataloader_num_workers=0, use_cpu=not on_cuda, fp16=on_cuda and run.precision == "fp16",
        bf16=on_cuda and run.precision == "bf16", **{checkpointing: run.gradient_checkpointing})


ENCODER = "prompt_encoder.safetensors"  # beside a reparametrised prefix's adapter: its MLP, for training on


@functools.cache
def trainer_class():
    """HF Trainer whose resumed and best-epoch weights are the checkpoint's, renamed weights included.

    transformers 5 saves some architectures' weights under their published names (a GPT-NeoX
    causal LM's `lm_head` as `embed_out`) and renames them in `from_pretrained`, but its Trainer
    loads a checkpoint's state dict as saved: the renamed weight is reported missing and keeps
    what the model had (seen: a resumed GPT-NeoX restarted from its base model's head, and the
    best epoch loaded at the end with the last epoch's head). Where a load left keys missing, the
    checkpoint is read again through `from_pretrained`.

    And a reparametrised prefix (prefix mode with `prefix_projection`): peft saves only the prefix
    its MLP produces, which a trained model cannot load (HF refuses the best epoch: "setting
    load_best_model_at_end=True can lead to errors") and from which training cannot go on. Each
    checkpoint also keeps the MLP's own weights (ENCODER); resuming and the best epoch load those.
    The adapter peft saves stays what inference loads."""
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class CheckpointTrainer(Trainer):
        _missing: tuple = ()
        step_losses = None  # tracking.StepLosses: each micro-batch's loss, for tracking and progress between logs

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.step_losses is not None:
                self.step_losses.add(loss, self.state.global_step)
            return loss

        def _issue_warnings_after_load(self, load_result):
            self._missing = tuple(load_result.missing_keys)
            super()._issue_warnings_after_load(load_result)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)  # before the on_save callbacks: Ray copies the folder then
            encoder = self._prompt_encoder(self.model)
            if encoder is not None:
                from safetensors.torch import save_file

                folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
                save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, os.path.join(folder, ENCODER))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if self._load_prompt_encoder(model or self.model, resume_from_checkpoint):
                return
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            self._load_renamed(model or self.model, resume_from_checkpoint)

        def _load_best_model(self):
            if self._load_prompt_encoder(self.model, self.state.best_model_checkpoint):
                return
            super()._load_best_model()
            self._load_renamed(self.model, self.state.best_model_checkpoint)

        def _prompt_encoder(self, model):
            """A reparametrised prefix's encoder (what peft does not save), or None."""
            model = self.accelerator.unwrap_model(model)
            config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
            return model.prompt_encoder[model.active_adapter] if getattr(config, "prefix_projection", False) else None

        def _load_prompt_encoder(self, model, checkpoint) -> bool:
            encoder = self._prompt_encoder(model)
            if encoder is None:
                return False
            from safetensors.torch import load_file

            encoder.load_state_dict(load_file(os.path.join(checkpoint, ENCODER)))
            return True

        def _load_renamed(self, model, checkpoint) -> None:
            if not self._missing:
                return
            model = self.accelerator.unwrap_model(model)
            fresh = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
            model.load_state_dict(fresh.state_dict())
            self._missing = ()

    return CheckpointTrainer


class FitAttempts:
    """`fit(spec, model)` for run_with_oom_retry: one HF Trainer per attempt, trained (resumed from the
    run's Ray checkpoint when it has one); `specs` lists each attempt's spec."""

    def __init__(self, run: FoldRun, tokenizer, train_ds, select_ds, out_dir: str, checkpoint, ray_train: bool,
                 on_cuda: bool, started: float, tracker):
        self.run, self.tokenizer, self.train_ds, self.select_ds = run, tokenizer, train_ds, select_ds
        self.out_dir, self.checkpoint, self.ray_train, self.on_cuda, self.started = out_dir, checkpoint, ray_train, on_cuda, started
        self.tracker = tracker
        self.specs: list[BackboneSpec] = []

    def __call__(self, spec: BackboneSpec, model):
        # a folder per attempt: Ray's callback copies the highest-numbered checkpoint in it, which
        # must not be one an earlier (out-of-memory) attempt left
        trainer = self.trainer(spec, model, os.path.join(self.out_dir, f"attempt{len(self.specs)}"))
        self.specs.append(spec)
        if self.checkpoint:  # restarted after a failure or a killed driver: continue mid-run
            with self.checkpoint.as_directory() as ckpt_dir:
                trainer.train(resume_from_checkpoint=os.path.join(ckpt_dir, HF_CHECKPOINT))
        else:
            trainer.train()
        return trainer

    def trainer(self, spec: BackboneSpec, model, output_dir: str):
        """One attempt's HF Trainer: the run's callbacks, and the trainer `build` makes for the task."""
        from transformers import EarlyStoppingCallback, PrinterCallback

        from nikl_ray.tracking import StepLosses, untracked
        from nikl_ray.train_callbacks import BestKeptByRay, Progress, RankForRay, ResourceLog, Track

        run, select, target = self.run, self.select_ds is not None, self.run.tracking or untracked()
        losses = StepLosses(target.log_every_steps)
        callbacks = [ResourceLog(self.started, self.on_cuda), Track(self.tracker, losses, target.log_every_steps),
                     Progress(run.name, select, losses, target.progress_seconds, bars=target.progress_bars and self.ray_train)]
        if self.ray_train:
            from ray.train.huggingface.transformers import RayTrainReportCallback

            callbacks.append(RayTrainReportCallback())
        if select:
            callbacks[:0] = [EarlyStoppingCallback(spec.early_stopping_patience), RankForRay(),
                             BestKeptByRay(run.name, resumed=bool(self.checkpoint))]
        trainer = self.build(spec, model, training_arguments(spec, run, output_dir, select, self.on_cuda), callbacks)
        trainer.remove_callback(PrinterCallback)  # its raw dict per log line; Progress says it once
        trainer.step_losses = losses
        return trainer

    def build(self, spec: BackboneSpec, model, args, callbacks: list):
        """A classification Trainer: padded rows, the selection slice's scores, the run's loss."""
        from transformers import DataCollatorWithPadding

        return trainer_class()(model=model, args=args, train_dataset=self.train_ds, eval_dataset=self.select_ds,
                               data_collator=DataCollatorWithPadding(self.tokenizer), processing_class=self.tokenizer,
                               compute_metrics=functools.partial(compute_metrics, task=self.run.task), callbacks=callbacks,
                               compute_loss_func=loss_function(spec.loss, self.run.task.multi_label))


def heldout_report(probs: np.ndarray, data, run: FoldRun) -> dict:
    """The held-out fold, once, for the table and the degenerate check: it chose no epoch."""
    from nikl_ray.metrics import scores

    task = run.task
    y_held = data.labels[run.heldout_idx]
    out = {f"heldout_{k}": v for k, v in scores(y_held, plain_decisions(probs, task.multi_label), task.labels,
                                                task.multi_label).items()}
    out["degenerate"] = degenerate_reason(y_held, probs, data.labels[run.train_idx], task.multi_label)
    return out
