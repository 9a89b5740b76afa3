"""The Ray Train worker of a generate task: one decoder fine-tuned on one fold's question → answer
pairs with HF Trainer (nikl_ray/qa/sft.py: prompts, pairs, the loss on answer tokens only).

It is the classification worker's twin (nikl_ray/worker.py) and shares its parts: the training
arguments, one fit attempt per out-of-memory retry, Ray's report callback and checkpoints, the
resume after a kill, the callbacks that keep Ray's best checkpoint HF's best epoch. What differs:
after every epoch the selection slice's questions are answered greedily and scored by the task's
metric (or, `select_by: loss`, the epoch with the lowest loss on their reference answers wins);
at the end the held-out questions are answered once, for the train table and the degenerate check
(the same answer to nearly every question), and a final run writes its answers to the held-out
and routed test questions for the features stage (nikl_ray/qa/answers.py takes them).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections import Counter

import numpy as np

from nikl_ray import handoff
from nikl_ray.backbones import quiet_worker
from nikl_ray.modes import mode_of
from nikl_ray.placement import cap_memory
from nikl_ray.runfiles import final_path
from nikl_ray.runspec import FoldRun
from nikl_ray.worker import (FitAttempts, end_summary, inference_model, in_ray_train, open_tracker, report_restored_epochs,
                             run_with_oom_retry)

log = logging.getLogger(__name__)
SAME_ANSWER_SHARE = 0.9  # a fold model that gives one answer to this share of its held-out questions is degenerate


def train_qa_fold(config: dict) -> None:
    """The Ray Train loop of a generate task: `config["run"]` is the FoldRun to train."""
    started = time.time()
    run: FoldRun = config["run"]
    quiet_worker(mode_of(run.backbone).needs_bitsandbytes)
    for name in ("ray.train", None):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray
    import ray.train
    import torch
    from transformers import set_seed

    from nikl_ray.artifacts import write_json
    from nikl_ray.backbones import load_tokenizer
    from nikl_ray.qa.data import queries, test_queries
    from nikl_ray.qa.sft import pairs_dataset

    spec = run.backbone
    data = ray.get(run.data) if isinstance(run.data, ray.ObjectRef) else run.data
    set_seed(spec.seed)
    cap_memory(run.memory_fraction, run.device)
    on_cuda = run.device == "cuda" and torch.cuda.is_available()
    ray_train = in_ray_train()
    checkpoint = ray.train.get_checkpoint() if ray_train else None
    if checkpoint:
        report_restored_epochs(checkpoint)
    tokenizer = load_tokenizer(spec)
    tokenizer.padding_side = "right"  # training batches; answering pads on the left
    prompter = fold_prompter(spec, tokenizer, data, run.train_idx)
    train_ds = pairs_dataset(tokenizer, prompter, data, run.train_idx, spec, own_item=True)
    select_ds = pairs_dataset(tokenizer, prompter, data, run.select_idx, spec, own_item=False) if len(run.select_idx) else None
    judge = SelectionJudge(run, data, prompter, tokenizer) if select_ds is not None and spec.select_by == "score" else None
    model = load_model(run, tokenizer)
    with open_tracker(run) as tracker:
        with tempfile.TemporaryDirectory(prefix="nikl-ray-hf-", ignore_cleanup_errors=True) as out_dir:
            fit = QAFitAttempts(run, tokenizer, train_ds, select_ds, out_dir, checkpoint, ray_train, on_cuda, started, tracker,
                                judge=judge)
            trainer = run_with_oom_retry(spec, run.fold, run.estimate_gb, model, fit,
                                         functools.partial(load_model, run, tokenizer))
        speed = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
        final = {"train_steps_per_second": speed.get("train_steps_per_second"),
                 "train_samples_per_second": speed.get("train_samples_per_second"), "train_pairs": len(train_ds),
                 "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if on_cuda else None}
        if run.predict_heldout:
            from nikl_ray.qa.answers import write_handoff

            model, batch = inference_model(trainer), trainer.args.per_device_eval_batch_size
            held_qs = queries(data.ids, data.questions, data.contexts, run.heldout_idx)
            held = answer_queries(spec, tokenizer, model, prompter, held_qs, batch)
            final.update(heldout_report(run, data, held_qs, [a[0][0] for a in held]))
            step = handoff.step_in_hand(trainer, select_ds is not None, resumed=bool(checkpoint), attempts=len(fit.specs))
            if run.features is not None and step is not None:
                test_qs = test_queries(data.test_ids, data.test_questions, data.test_contexts, run.features.test_idx)
                test = answer_queries(spec, tokenizer, model, prompter, test_qs, batch)
                write_handoff(run.features, {"oof": ([q.id for q in held_qs], held), "test": ([q.id for q in test_qs], test)},
                              step)
        tracker.summary(end_summary(trainer, final), trainer.state.global_step)
    context = ray.get_runtime_context() if ray_train else None
    final.update(train_fn_seconds=time.time() - started, pid=os.getpid(), node=context.get_node_id() if context else None)
    write_json(final_path(run.storage, run.name), final)


# ---------------------------------------------------------------------------- what it builds
def load_model(run: FoldRun, tokenizer):
    from nikl_ray.backbones import load_for_generation

    return load_for_generation(run.backbone, tokenizer, precision=run.precision,
                               gradient_checkpointing=run.gradient_checkpointing)


def fold_prompter(spec, tokenizer, data, train_idx):
    """The prompts of a fold model: retrieval (if any) only from the items it trains on."""
    from nikl_ray.qa.sft import Prompter

    return Prompter(tokenizer, data.questions, data.answers, np.asarray(train_idx), spec.retrieve.k if spec.retrieve else 0)


def answer_queries(spec, tokenizer, model, prompter, qs: list, batch_size: int, *, samples: int | None = None) -> list:
    """Per query: its greedy answer and `spec.samples` sampled ones, each (text, mean log-probability)."""
    from nikl_ray.qa.sft import generate

    return generate(model, tokenizer, prompter.prompts(qs), spec.max_new_tokens, batch_size=batch_size,
                    samples=spec.samples if samples is None else samples, temperature=spec.temperature, seed=spec.seed,
                    max_length=spec.max_length)


class SelectionJudge:
    """An epoch's selection score: the task's metric of greedy answers to (a fixed sample of) the
    selection slice's questions, against their items' references."""

    def __init__(self, run: FoldRun, data, prompter, tokenizer):
        from nikl_ray.qa.data import queries

        qs = queries(data.ids, data.questions, data.contexts, run.select_idx)
        cap = run.backbone.select_questions
        if cap and cap < len(qs):
            qs = [qs[i] for i in sorted(np.random.default_rng(run.backbone.seed).choice(len(qs), cap, replace=False))]
        self.run, self.queries, self.prompter, self.tokenizer = run, qs, prompter, tokenizer
        self.references = [data.answers[q.item] for q in qs]

    def __call__(self, model) -> float:
        from nikl_ray.qa.metrics import get_embedder, score_answers

        task = self.run.task
        answers = answer_queries(self.run.backbone, self.tokenizer, model, self.prompter, self.queries,
                                 2 * self.run.backbone.batch_size, samples=0)
        embedder = get_embedder(task.embedder) if task.metric == "cosine" else None
        return float(np.mean(score_answers(task.metric, [a[0][0] for a in answers], self.references, embedder)))


class QAFitAttempts(FitAttempts):
    """The classification worker's fit attempts with a causal-LM trainer: pairs padded with labels
    -100, and each evaluation scored by the SelectionJudge (or by its negated loss)."""

    def __init__(self, *args, judge: SelectionJudge | None = None):
        super().__init__(*args)
        self.judge = judge

    def build(self, spec, model, args, callbacks: list):
        from transformers import DataCollatorForSeq2Seq

        from nikl_ray.qa.sft import IGNORE

        trainer = qa_trainer_class()(
            model=model, args=args, train_dataset=self.train_ds, eval_dataset=self.select_ds,
            data_collator=DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE), processing_class=self.tokenizer,
            callbacks=callbacks)
        trainer.judge = self.judge
        return trainer


@functools.cache
def qa_trainer_class():
    """The fold runs' Trainer (worker.trainer_class) whose evaluation adds `eval_score`: the judge's
    score of generated answers, or −loss."""
    from nikl_ray.worker import trainer_class

    class QATrainer(trainer_class()):
        judge = None

        def evaluation_loop(self, *args, **kwargs):
            out = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", "eval")
            model = self.accelerator.unwrap_model(self.model)
            out.metrics[f"{prefix}_score"] = self.judge(model) if self.judge else -out.metrics[f"{prefix}_loss"]
            return out

    return QATrainer


def heldout_report(run: FoldRun, data, qs: list, answers: list[str]) -> dict:
    """The held-out questions, once, for the table and the degenerate check: they chose nothing."""
    from nikl_ray.qa.metrics import get_embedder, score_answers

    task = run.task
    embedder = get_embedder(task.embedder) if task.metric == "cosine" else None
    score = float(np.mean(score_answers(task.metric, answers, [data.answers[q.item] for q in qs], embedder)))
    return {f"heldout_{task.metric}": score, "degenerate": degenerate_answers(answers)}


def degenerate_answers(answers: list[str]) -> str | None:
    """Why a fold model's answers are worthless, or None: one answer to nearly every question."""
    if not answers:
        return None
    text, n = Counter(answers).most_common(1)[0]
    if len(answers) > 1 and n / len(answers) >= SAME_ANSWER_SHARE:
        return f"the same answer to {n / len(answers):.0%} of its held-out questions: {text[:60]!r}"
    return None
