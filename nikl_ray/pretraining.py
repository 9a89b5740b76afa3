"""The Ray Train loop that continues a backbone's pretraining (masked or causal LM) on unlabeled text.

The one job of the system that is a single large run, so it runs on several data-parallel Ray
Train workers (TorchTrainer: DDP, gloo on CPU, NCCL on GPU); HF Trainer shards the batches.
Its rows are full blocks of packed text (`lm_dataset`; `packing: false`, one padded row per text).
It stops at its step count or time budget (all workers agree on the step: rank 0's clock is
shared every few steps), checkpoints every `save_every_steps` through Ray's report callback
(what a killed run resumes from), prints steps/s, tokens/s, loss and perplexity as it goes,
and, on rank 0, saves the model (safetensors) and tokenizer for the later stages.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nikl_ray.backbones import BackboneSpec
from nikl_ray.runfiles import HF_CHECKPOINT, final_path, trainer_state
from nikl_ray.tracking import Target, Tracker, untracked

log = logging.getLogger(__name__)
STOP_CHECK_STEPS = 10  # how often the workers agree on the time budget


@dataclass(frozen=True)
class PretrainRun:
    backbone: BackboneSpec
    texts: object  # ObjectRef of the training texts
    heldout: object  # ObjectRef of the held-out texts
    name: str
    storage: str
    model_dir: str
    num_workers: int
    device: str
    precision: str
    resources: dict
    max_failures: int
    tracking: Target | None = None  # where rank 0 logs


def lm_dataset(tokenizer, texts: list[str], max_length: int, *, packed: bool, mlm: bool):
    """The language-modelling rows of `texts`, packed or (`packed=False`) one row per text, cut at
    `max_length` and padded by the collator.

    Packed rows are full `max_length` blocks of the texts' tokens in order (HF's `group_texts`; the
    tail of each thousand texts that fills no block is dropped). For mlm the encoder's own
    [CLS] … [SEP] mark each text. For clm each block also carries `position_ids` that restart at
    every text and `labels` with the text's first token left out: HF's causal mask then keeps each
    text's attention to itself (`LMCollator`), so a block teaches what one padded row per text
    teaches, with no step spent on padding."""
    from datasets import Dataset

    ds = Dataset.from_dict({"text": texts})
    if not packed:
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                      remove_columns=["text"])

    def blocks(batch):
        rows = tokenizer(batch["text"])["input_ids"]
        ids = [t for row in rows for t in row]
        starts = [i == 0 for row in rows for i in range(len(row))]
        cuts = range(0, len(ids) // max_length * max_length, max_length)
        if mlm:
            return {"input_ids": [ids[c:c + max_length] for c in cuts], "attention_mask": [[1] * max_length for _ in cuts]}
        out = {"input_ids": [], "position_ids": [], "labels": []}
        for c in cuts:
            block, begins = ids[c:c + max_length], starts[c:c + max_length]
            # positions from 0 at each text and at the block's start (a text cut by the block edge)
            pos, p = [], 0
            for j, begin in enumerate(begins):
                p = 0 if begin or j == 0 else p + 1
                pos.append(p)
            out["input_ids"].append(block)
            out["position_ids"].append(pos)
            out["labels"].append([-100 if begin else t for t, begin in zip(block, begins)])
        return out

    return ds.map(blocks, batched=True, batch_size=1000, remove_columns=["text"])


class LMCollator:
    """The collator for `lm_dataset`'s rows (Trainer takes one for training and evaluation): packed clm
    blocks, which arrive with their labels and positions, are stacked as they are; every other row goes
    through HF's language-modelling collator (padding, masking). Packed clm training needs `use_cache`
    off: HF reads the texts' boundaries from `position_ids` only then."""

    def __init__(self, tokenizer, mlm: bool, mask_probability: float):
        from transformers import DataCollatorForLanguageModeling, default_data_collator

        self.lm = DataCollatorForLanguageModeling(tokenizer, mlm=mlm, mlm_probability=mask_probability)
        self.stack = default_data_collator

    def __call__(self, features):
        return self.stack(features) if "position_ids" in features[0] else self.lm(features)


def pretrain_loop(config: dict) -> None:
    started = time.time()
    from nikl_ray.backbones import quiet_worker

    run: PretrainRun = config["run"]
    quiet_worker(False)
    for name in ("ray.train", None):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    from nikl_ray.train_callbacks import Track

    spec, cfg = run.backbone, run.backbone.pretrain
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    set_seed(cfg.seed)
    on_cuda = run.device == "cuda" and torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(spec.checkpoint, trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    mlm = spec.objective == "mlm"
    model = (AutoModelForMaskedLM if mlm else AutoModelForCausalLM).from_pretrained(
        spec.checkpoint, trust_remote_code=spec.trust_remote_code)

    train_ds = lm_dataset(tokenizer, ray.get(run.texts), cfg.max_length, packed=cfg.packing, mlm=mlm)
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:  # with a cache, HF's causal mask ignores the packed texts' boundaries
        model.config.use_cache = False
    # held out text by text, packed or not: its perplexity is per text, as the folds will read rows
    held_ds = lm_dataset(tokenizer, ray.get(run.heldout), cfg.max_length, packed=False, mlm=mlm)
    budget = cfg.minutes * 60 if cfg.minutes else None
    every_s = (run.tracking or untracked()).progress_seconds

    class Budget(TrainerCallback):
        """Stops every worker at the same step once rank 0's clock (over all attempts) passes the budget,
        and prints progress on rank 0: at each log, and at least every `every_s` seconds."""

        spent_before = 0.0
        t0 = tokens0 = step0 = None
        printed, loss = 0.0, float("nan")

        def on_train_begin(self, args, state, control, **kw):
            self.spent_before = next((h["pretrain_seconds"] for h in reversed(state.log_history) if "pretrain_seconds" in h), 0.0)
            self.t0, self.tokens0, self.step0 = time.time(), state.num_input_tokens_seen, state.global_step
            self.printed = self.t0

        def spent(self) -> float:
            return self.spent_before + time.time() - self.t0

        def on_step_end(self, args, state, control, **kw):
            if budget and state.global_step % STOP_CHECK_STEPS == 0:
                stop = torch.tensor([1.0 if self.spent() >= budget else 0.0])
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(stop, src=0)
                control.should_training_stop = bool(stop.item())
            if time.time() - self.printed >= every_s:
                self.say(state)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                state.log_history.append({"pretrain_seconds": self.spent(), "step": state.global_step})
                self.loss = logs["loss"]
                self.say(state)

        def say(self, state) -> None:
            self.printed = time.time()
            if rank == 0:
                dt = max(self.printed - self.t0, 1e-9)
                print(f"{run.name} step {state.global_step}: loss {self.loss:.4f} (perplexity "
                      f"{math.exp(min(self.loss, 20)):.1f}), {(state.global_step - self.step0) / dt:.2f} steps/s, "
                      f"{(state.num_input_tokens_seen - self.tokens0) / dt:.0f} tokens/s, {self.spent():.0f} s"
                      + (f" of {budget:.0f}" if budget else ""), flush=True)

    args = TrainingArguments(
        # one folder per rank: every rank reports its checkpoint folder to Ray, which merges them; in a
        # shared one, rank 1 reported (and Ray copied) files rank 0 was still writing
        output_dir=os.path.join(run.storage, run.name, "hf", f"rank{rank}"), max_steps=cfg.steps or 10**9, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size, weight_decay=0.01,
        warmup_steps=0.05 if cfg.steps else 0, lr_scheduler_type="linear" if cfg.steps else "constant",
        logging_steps=STOP_CHECK_STEPS * 2, save_strategy="steps", save_steps=cfg.save_every_steps, save_total_limit=1,
        report_to="none", disable_tqdm=True, seed=cfg.seed, data_seed=cfg.seed, use_cpu=not on_cuda,
        bf16=on_cuda and run.precision == "bf16", fp16=on_cuda and run.precision == "fp16",
        ddp_find_unused_parameters=False, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding")
    params = {"backbone": spec.name, "checkpoint": spec.checkpoint, "objective": spec.objective,
              **{f"pretrain.{k}": v for k, v in cfg.model_dump(mode="json").items() if k != "corpus"},
              "train_texts": len(train_ds), "heldout_texts": len(held_ds), "world_size": world, "device": run.device}
    tracker = Tracker.open(run.tracking, run.name, Path(run.storage) / run.name, params) if rank == 0 else Tracker([])
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=held_ds,
                      data_collator=LMCollator(tokenizer, mlm, cfg.mask_probability),
                      processing_class=tokenizer, callbacks=[Budget(), Track(tracker), RayTrainReportCallback()])
    trainer.remove_callback(PrinterCallback)
    checkpoint = ray.train.get_checkpoint()
    resumed_from = 0
    with tracker:
        if checkpoint:  # a killed run: continue from its last checkpoint
            with checkpoint.as_directory() as ckpt_dir:
                path = os.path.join(ckpt_dir, HF_CHECKPOINT)
                resumed_from = trainer_state(path)["global_step"]
                trainer.train(resume_from_checkpoint=path)
        else:
            trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"] if len(held_ds) else float("nan")
        perplexity = math.exp(min(eval_loss, 50)) if eval_loss == eval_loss else None
        tracker.summary({"heldout/loss": eval_loss, "heldout/perplexity": perplexity,
                         "tokens_seen": trainer.state.num_input_tokens_seen}, trainer.state.global_step)
    mine = {"rank": rank, "world_size": world, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
            "steps": trainer.state.global_step - resumed_from, "seconds": time.time() - started}
    out = Path(run.storage) / run.name
    from nikl_ray.artifacts import write_json

    write_json(out / f"worker{rank}.json", mine)
    if use_cache is not None:
        model.config.use_cache = use_cache
    trainer.save_model(run.model_dir)  # safetensors, with the tokenizer (written by rank 0)
    if rank == 0:
        losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h and "step" in h]
        write_json(final_path(run.storage, run.name), {
            "steps": trainer.state.global_step, "resumed_from_step": resumed_from, "loss_curve": losses,
            "tokens_seen": trainer.state.num_input_tokens_seen, "heldout_loss": eval_loss,
            "heldout_perplexity": perplexity,
            "seconds": next((h["pretrain_seconds"] for h in reversed(trainer.state.log_history) if "pretrain_seconds" in h),
                            None),
            "world_size": world,
            # this attempt's trainer.train() (HF's clock: steps, collation, logging, checkpoints)
            "train_runtime": next((h["train_runtime"] for h in reversed(trainer.state.log_history) if "train_runtime" in h),
                                  None)})
