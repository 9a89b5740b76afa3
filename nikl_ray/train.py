"""The train stage: every (backbone, fold) pair is one Ray Train run of an HF Trainer.

    nikl-ray train --config examples/tiny.yaml --local       # this machine
    ray job submit --working-dir . -- python ray_jobs/train_folds.py --config …   # a cluster

Each run is a `TorchTrainer` with one worker whose resources come from the placement plan
(a 1/k GPU share, or CPUs on a CPU machine); all pairs are submitted at once and Ray runs as
many together as the cluster holds. The worker trains with HF `Trainer`, evaluates the
held-out fold every epoch (micro-F1, per-label F1, loss), stops early, and reports metrics
and checkpoints to Ray through Ray's own `RayTrainReportCallback`. Ray keeps the best
checkpoint (by held-out micro-F1) and the latest one (for resuming) under the results root.
A pair whose manifest matches is skipped; an interrupted pair resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from nikl_ray.artifacts import manifest_problem, write_manifest, write_text, load_manifest
from nikl_ray.backbones import MARKERS, BackboneSpec, count_params, load_for_classification, load_tokenizer
from nikl_ray.config import Experiment
from nikl_ray.data import Rows
from nikl_ray.placement import ModelShape, Placement, estimate_memory_bytes, format_plan, place

METRIC = "eval_micro_f1"
HF_CHECKPOINT = "checkpoint"  # the HF checkpoint folder inside a Ray checkpoint (RayTrainReportCallback)


# ---------------------------------------------------------------------------- encoding
def encode(tokenizer, spec: BackboneSpec, texts: list[str], targets: list[str | None]) -> dict:
    """Tokenize rows with the target span marked as `spec.target_encoding` says.

    markers: `{text}<t1>{target}<t2>` (an empty span for a null target); pair: (text, target)
    as a sentence pair; none: the text alone. Truncation trims the longer segment first, so a
    long text never pushes the target out.
    """
    if spec.target_encoding == "none":
        return tokenizer(texts, truncation=True, max_length=spec.max_length)
    if spec.target_encoding == "markers":
        second = [f"{MARKERS[0]}{t or ''}{MARKERS[1]}" for t in targets]
    else:
        second = [t or "" for t in targets]
    return tokenizer(texts, second, truncation="longest_first", max_length=spec.max_length)


class EncodedRows:
    """A torch-style dataset of tokenized rows (labels attached when given)."""

    def __init__(self, enc: dict, labels: np.ndarray | None, multi_label: bool):
        self.enc, self.labels, self.multi_label = enc, labels, multi_label

    def __len__(self) -> int:
        return len(self.enc["input_ids"])

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.enc.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i].tolist() if self.multi_label else int(self.labels[i].argmax())
        return item


def asymmetric_loss(outputs, labels, num_items_in_batch=None, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
    """Asymmetric loss (Ridnik et al., 2021) for multi-label: down-weights easy negatives.

    Written here because neither transformers nor torch ships it (12 lines, tested).
    """
    import torch

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    p = torch.sigmoid(logits.float())
    p_neg = (p - clip).clamp(min=0) if clip else p
    y = labels.float()
    loss_pos = y * torch.log(p.clamp(min=1e-8)) * (1 - p) ** gamma_pos
    loss_neg = (1 - y) * torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg ** gamma_neg
    return -(loss_pos + loss_neg).sum() / labels.shape[0]


def _problem_type(multi_label: bool) -> str:
    return "multi_label_classification" if multi_label else "single_label_classification"


# ---------------------------------------------------------------------------- the worker
def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def oom_message(spec: BackboneSpec, fold, estimate_gb, batch_size: int) -> str:
    est = f"{estimate_gb:.1f} GB" if estimate_gb is not None else "unknown"
    return (f"backbone {spec.name} fold {fold} ran out of memory at batch size {batch_size} "
            f"(placement estimate {est}, mode {spec.mode}, max_length {spec.max_length}). "
            "Set `oom_retry: true` on the backbone to retry at half the batch size with twice the gradient "
            "accumulation (same effective batch), or lower batch_size / max_length, or raise resources.card_gb only "
            "if the card really is larger.")


def run_with_oom_retry(spec: BackboneSpec, fold, estimate_gb, model, fit, reload_model) -> None:
    """fit(spec, model); on out-of-memory, halve the batch (doubling accumulation) if the spec allows it."""
    import gc

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
            print(f"{oom_message(spec, fold, estimate_gb, spec.batch_size * 2)} Retrying at batch size {spec.batch_size} "
                  f"× {spec.grad_accum} accumulation steps.", flush=True)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            model = reload_model()



def train_fold_worker(config: dict) -> None:
    """Runs inside a Ray Train worker: train one backbone on one fold with HF Trainer."""
    started = time.time()  # everything from here (imports included) counts as time in the function
    import os
    import tempfile

    import ray
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

    from nikl_ray.metrics import scores
    from nikl_ray.tasks import TaskSpec

    spec = BackboneSpec(**config["backbone"])
    task = TaskSpec(**config["task"])
    data = ray.get(config["data"]) if isinstance(config["data"], ray.ObjectRef) else config["data"]
    held = set(config["held_out"])
    tr = [i for i, rid in enumerate(data["ids"]) if rid not in held]
    va = [i for i, rid in enumerate(data["ids"]) if rid in held]
    set_seed(spec.seed)
    use_cuda = torch.cuda.is_available()
    if use_cuda and 0 < config.get("gpu_share", 1.0) < 1.0:
        # Ray's fractional GPU only schedules; this is what keeps the trial inside its share.
        torch.cuda.set_per_process_memory_fraction(config["gpu_share"])

    tokenizer = load_tokenizer(spec)
    model = load_for_classification(spec, len(task.labels), _problem_type(task.multi_label), tokenizer)
    labels = np.asarray(data["labels"], dtype=np.float32)
    texts, targets = data["texts"], data["targets"]
    make = lambda idx: EncodedRows(encode(tokenizer, spec, [texts[i] for i in idx], [targets[i] for i in idx]),  # noqa: E731
                                   labels[idx], task.multi_label)
    train_ds, eval_ds = make(tr), make(va)

    def compute_metrics(pred):
        logits, y = pred.predictions, pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        if task.multi_label:
            return scores(y, logits > 0, task.labels)
        onehot = np.eye(len(task.labels))
        return scores(onehot[y.astype(int)], onehot[logits.argmax(1)], task.labels)

    class ResourceLog(TrainerCallback):
        """Adds time-in-function, peak device memory and the step this process started from (0, or
        the step of the checkpoint it resumed) to the log after each evaluation: before the epoch's
        checkpoint is written (on_save would come after), so each checkpoint holds its own entry."""

        start_step = 0

        def on_train_begin(self, args, state, control, **kw):
            self.start_step = state.global_step  # HF has restored the checkpoint's state by now

        def on_evaluate(self, args, state, control, **kw):
            extra = {"train_fn_seconds": time.time() - started, "resumed_from_step": self.start_step}
            if use_cuda:
                extra["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
            state.log_history.append(extra)

    precision = spec.precision if spec.precision != "auto" else ("bf16" if use_cuda and torch.cuda.is_bf16_supported() else "fp16")
    grad_ckpt = spec.gradient_checkpointing if spec.gradient_checkpointing is not None else (use_cuda and spec.family == "decoder")
    out_dir = tempfile.mkdtemp(prefix="nikl-ray-hf-")

    def build_trainer(spec: BackboneSpec, model):
        args = TrainingArguments(
            output_dir=out_dir, num_train_epochs=spec.epochs, learning_rate=spec.lr, weight_decay=spec.weight_decay,
            warmup_steps=spec.warmup_ratio, per_device_train_batch_size=spec.batch_size,
            per_device_eval_batch_size=spec.batch_size * 2, gradient_accumulation_steps=spec.grad_accum,
            eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
            load_best_model_at_end=True, metric_for_best_model="micro_f1", greater_is_better=True, save_total_limit=2,
            seed=spec.seed, data_seed=spec.seed, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=not use_cuda, fp16=use_cuda and precision == "fp16", bf16=use_cuda and precision == "bf16",
            gradient_checkpointing=grad_ckpt,
        )
        return prepare_trainer(Trainer(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=compute_metrics,
            compute_loss_func=asymmetric_loss if spec.loss == "asl" else None,
            callbacks=[EarlyStoppingCallback(spec.early_stopping_patience), ResourceLog(), RayTrainReportCallback()]))

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        # Tell whoever listens now the epochs the run already has (a Tune trial restarted with a
        # killed search hears only from here on; a run restored after its last epoch reports nothing new).
        with checkpoint.as_directory() as ckpt_dir:
            for entry in read_history(ckpt_dir):
                if METRIC in entry:
                    ray.train.report(entry)

    def fit(spec: BackboneSpec, model):
        trainer = build_trainer(spec, model)
        if checkpoint:  # restarted after a failure or a killed driver: continue mid-run
            with checkpoint.as_directory() as ckpt_dir:
                trainer.train(resume_from_checkpoint=os.path.join(ckpt_dir, HF_CHECKPOINT))
        else:
            trainer.train()

    def reload_model():
        return load_for_classification(spec, len(task.labels), _problem_type(task.multi_label), tokenizer)

    run_with_oom_retry(spec, config.get("fold"), config.get("estimate_gb"), model, fit, reload_model)


# ---------------------------------------------------------------------------- the driver
def plan_placements(exp: Experiment, use_gpu: bool) -> dict[str, Placement]:
    from transformers import AutoConfig

    plans = {}
    for spec in exp.backbones:
        config = AutoConfig.from_pretrained(spec.checkpoint, trust_remote_code=spec.trust_remote_code)
        shape = ModelShape.from_config(config, count_params(spec))
        grad_ckpt = spec.gradient_checkpointing if spec.gradient_checkpointing is not None else spec.family == "decoder"
        est = estimate_memory_bytes(shape, mode=spec.mode, batch_size=spec.batch_size, max_length=spec.max_length,
                                    lora_r=spec.lora_r, lora_targets=spec.resolved_lora_targets() if spec.uses_lora else None,
                                    gradient_checkpointing=grad_ckpt)
        plans[spec.name] = place(spec.name, est, card_gb=exp.resources.card_gb, use_gpu=use_gpu,
                                 cpus=exp.resources.cpus_per_trial, max_trials_per_card=exp.resources.max_trials_per_card)
    return plans


def concurrent_slots(placements: list[Placement], cpus: float, gpus: float) -> int:
    """How many trials the cluster can run at once under the plan (the tightest backbone decides)."""
    slots = min(int(cpus // p.cpus) for p in placements)
    if gpus:
        slots = min(slots, min(int(round(gpus * p.trials_per_card)) for p in placements if p.gpu_share) or slots)
    return max(1, slots)


def make_trainer(loop_config: dict, resources: dict, use_gpu: bool, storage: str, run_name: str, max_failures: int,
                 callbacks: list | None = None):
    """The TorchTrainer of one (backbone, fold) run: used by the train stage and by every tune trial."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_fold_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                                                checkpoint_score_order="max"),
                             callbacks=callbacks))


def _fit_one(loop_config: dict, resources: dict, use_gpu: bool, storage: str, run_name: str, max_failures: int) -> dict:
    """Build and fit one TorchTrainer; returns where its best checkpoint is. Runs as a Ray task."""
    trainer = make_trainer(loop_config, resources, use_gpu, storage, run_name, max_failures)
    t0 = time.time()
    result = trainer.fit()
    best = result.get_best_checkpoint(metric=METRIC, mode="max")
    return {"best_checkpoint": best.path, "latest_checkpoint": result.checkpoint.path, "wall_seconds": time.time() - t0}


def pair_dir(exp: Experiment, backbone: str, fold: int) -> Path:
    return exp.results / "train" / backbone / f"fold{fold}"


def pair_inputs(exp: Experiment, spec: BackboneSpec, fold: int, folds: dict) -> dict:
    held = hashlib.sha256("\n".join(folds["folds"][fold]).encode()).hexdigest()
    return {"backbone": spec.model_dump(mode="json"), "task": exp.task.model_dump(mode="json"), "fold": fold,
            "held_out_hash": held, "data_hash": folds["data_hash"]}


def read_history(checkpoint_dir: str | Path) -> list[dict]:
    """The HF log history saved in a checkpoint (per-epoch train loss and eval metrics)."""
    state = Path(checkpoint_dir) / HF_CHECKPOINT / "trainer_state.json"
    return json.loads(state.read_text())["log_history"]


def summarize_pair(best_checkpoint: str, latest_checkpoint: str) -> dict:
    history = read_history(latest_checkpoint)
    evals = [h for h in history if METRIC in h]
    best = max(evals, key=lambda h: h[METRIC])
    timing = [h for h in history if "train_fn_seconds" in h]
    return {"best_epoch": int(round(best["epoch"])), "micro_f1": best[METRIC], "epochs_run": len(evals),
            "train_losses": [h["loss"] for h in history if "loss" in h and "eval_loss" not in h],
            "train_fn_seconds": timing[-1]["train_fn_seconds"] if timing else None,
            "peak_gpu_gb": max((h.get("peak_gpu_gb", 0) for h in timing), default=None)}


def rows_payload(rows: Rows) -> dict:
    return {"ids": rows.ids, "texts": rows.texts, "targets": rows.targets, "labels": rows.labels.tolist()}


def train_stage(exp: Experiment, rows: Rows, folds: dict, *, backbones: list[str] | None = None) -> Path:
    """Train every (backbone, fold) pair not already done; write the summary table. Returns its path."""
    import ray

    from nikl_ray.cluster import cluster_resources

    cpus, gpus = cluster_resources()
    use_gpu = exp.resources.use_gpu if exp.resources.use_gpu is not None else gpus > 0
    specs = [s for s in exp.backbones if backbones is None or s.name in backbones]
    plans = plan_placements(exp, use_gpu)
    print(format_plan([plans[s.name] for s in specs], card_gb=exp.resources.card_gb, total_cpus=cpus, total_gpus=gpus), flush=True)

    data_ref = ray.put(rows_payload(rows))
    launch = ray.remote(num_cpus=0)(_fit_one)
    todo, status = [], {}
    for spec in specs:
        for fold in range(folds["k"]):
            why = manifest_problem(pair_dir(exp, spec.name, fold), pair_inputs(exp, spec, fold, folds))
            if why is None:
                status[(spec.name, fold)] = "skipped (done)"
            else:
                print(f"train {spec.name} fold {fold}: {why} → training", flush=True)
                todo.append((spec, fold))
    # Submit no more runs than can hold resources at once: queued Train controllers would all
    # start up together and slow the running trials on small machines.
    slots = concurrent_slots([plans[s.name] for s in specs], cpus, gpus)
    pending, failures = {}, []
    while todo or pending:
        while todo and len(pending) < slots:
            spec, fold = todo.pop(0)
            d, p = pair_dir(exp, spec.name, fold), plans[spec.name]
            loop_config = {"backbone": spec.model_dump(mode="json"), "task": exp.task.model_dump(mode="json"),
                           "data": data_ref, "held_out": folds["folds"][fold], "gpu_share": p.gpu_share,
                           "fold": fold, "estimate_gb": p.estimate_gb}
            pending[launch.remote(loop_config, p.resources(), use_gpu, str(d.parent.resolve()), d.name,
                                  exp.resources.max_failures)] = (spec, fold)
        done, _ = ray.wait(list(pending), num_returns=1)
        spec, fold = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except Exception as e:  # one failed pair must not lose the others' results
            failures.append(f"{spec.name} fold {fold}: {e}")
            status[(spec.name, fold)] = "failed"
            print(f"train {spec.name} fold {fold}: FAILED: {e}", flush=True)
            continue
        d = pair_dir(exp, spec.name, fold)
        best = Path(out["best_checkpoint"])
        summary = summarize_pair(out["best_checkpoint"], out["latest_checkpoint"])
        vouched = [f for f in (best / HF_CHECKPOINT).iterdir() if f.suffix in (".safetensors", ".json")]
        write_manifest(d, inputs=pair_inputs(exp, spec, fold, folds), files=vouched,
                       extra={"best_checkpoint": str(best.relative_to(d.resolve()) / HF_CHECKPOINT),
                              "wall_seconds": out["wall_seconds"], **summary})
        status[(spec.name, fold)] = "trained"
        print(f"train {spec.name} fold {fold}: micro-F1 {summary['micro_f1']:.4f} (best epoch {summary['best_epoch']}, "
              f"{out['wall_seconds']:.1f} s)", flush=True)
    path = write_summary(exp, specs, folds["k"], status) if len(failures) < len(status) else None
    if failures:
        raise RuntimeError("some training runs failed (finished runs are kept; rerun to retry):\n  " + "\n  ".join(failures))
    return path


def write_summary(exp: Experiment, specs: list[BackboneSpec], k: int, status: dict) -> Path:
    rows = []
    for spec in specs:
        for fold in range(k):
            if (spec.name, fold) not in status or status[(spec.name, fold)] == "failed":
                continue
            m = load_manifest(pair_dir(exp, spec.name, fold))
            rows.append({"backbone": spec.name, "fold": fold, "mode": spec.mode, "best_epoch": m["best_epoch"],
                         "epochs_run": m["epochs_run"], "micro_f1": round(m["micro_f1"], 4),
                         "wall_seconds": round(m["wall_seconds"], 1), "status": status.get((spec.name, fold), "")})
    if not rows:
        raise RuntimeError("no finished training runs to summarize")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    out = exp.results / "train" / "summary.csv"
    write_text(out, buf.getvalue())
    write_text(out.with_suffix(".md"), markdown_table(rows))
    print(markdown_table(rows), flush=True)
    return out


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) and abs(v) < 1.5 else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
