"""Backbone specs and loading a model for one of them.

A backbone is a checkpoint (a local HF directory or a hub id) plus how to tune it: its `mode`,
one of the units in `nikl_ray.modes` (full, lora, qlora, gptq, prompt), which says how the model
loads, what trains and what a fold checkpoint keeps (the full model for `full`; the adapters,
the trained classification head and marker-token rows for the others). Weights are read and
written as safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nikl_ray.modes import MODES, mode_of

MARKERS = ("<t1>", "<t2>")

# LoRA target modules per architecture (model_type in config.json).
DEFAULT_LORA_TARGETS = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "electra": ["query", "value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
}
ENCODER_TYPES = {"electra", "bert", "roberta", "xlm-roberta", "deberta", "deberta-v2"}


class CorpusSource(BaseModel):
    """One file of unlabeled text for pretraining (see nikl_ray/corpus.py)."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="A jsonl, tsv/csv or plain-text file.")
    format: Literal["jsonl", "tsv", "csv", "lines"] | None = Field(None, description="Default: from the file.")
    field: str | list[str] | None = Field(None, description="jsonl: a dotted field; tsv/csv: a column; or a list of them "
                                                            "(a QA file's question columns). Default: the usual ones.")


class PretrainConfig(BaseModel):
    """Continue pretraining a backbone on unlabeled in-domain text before its folds (all its weights)."""

    model_config = ConfigDict(extra="forbid")
    corpus: list[CorpusSource] = Field(min_length=1, description="Files of text; a plain path is read by its format.")
    objective: Literal["mlm", "clm"] | None = Field(None, description="mlm (masked LM) or clm (causal LM); default: "
                                                                      "mlm for encoders, clm for decoders.")
    minutes: float | None = Field(None, gt=0, description="Wall-clock budget; default 10 when `steps` is not given.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps (instead of minutes).")
    max_length: int = Field(64, ge=8, le=8192, description="Tokens per training row: a block of packed text, or "
                                                           "one text cut there (packing: false).")
    packing: bool = Field(True, description="Texts run together and cut into full max_length blocks, as HF's "
                                            "language-modelling examples do: no step spent on padding. Causal LM: "
                                            "positions restart at each text and no text attends to another. An "
                                            "epoch is one pass over the corpus's tokens.")
    lr: float = Field(5e-4, gt=0, lt=1)
    batch_size: int = Field(64, ge=1, description="Per worker.")
    mask_probability: float = Field(0.15, gt=0, lt=1, description="mlm: share of tokens masked.")
    num_workers: int | None = Field(None, ge=1, description="Ray Train data-parallel workers; default: all the cluster "
                                                            "offers (one per card on GPU; on CPU, its CPUs / cpus_per_worker).")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs each worker holds (its torch threads); default "
                                                                  "resources.cpus_per_trial.")
    heldout: float = Field(0.01, ge=0, lt=0.5, description="Share of the texts (at most 2,000) kept for perplexity.")
    include_test: bool = Field(False, description="Also pretrain on the task's own test file (left out by default, "
                                                  "so held-out scores stay honest).")
    save_every_steps: int = Field(200, ge=1, description="Checkpoint interval (what a killed run resumes from).")
    seed: int = 0

    @field_validator("corpus", mode="before")
    @classmethod
    def _paths(cls, v):
        return [{"path": x} if isinstance(x, (str, Path)) else x for x in (v or [])]

    @model_validator(mode="after")
    def _budget(self) -> "PretrainConfig":
        if self.minutes and self.steps:
            raise ValueError("give minutes or steps, not both")
        if not self.minutes and not self.steps:
            self.minutes = 10.0
        return self


class RetrieveConfig(BaseModel):
    """Retrieval-augmented prompts (generate tasks): the k nearest training items by TF-IDF over questions."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(2, ge=1, le=16, description="Training items (question and its first reference) in each prompt.")


class BackboneSpec(BaseModel):
    """One backbone and how to tune it. Every field is documented here; YAML keys match."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Unique name, used in results paths.")
    checkpoint: str = Field(description="Local HF checkpoint directory, or a hub id (needs network).")
    family: Literal["encoder", "decoder"] | None = Field(
        None, description="encoder (first-token pooling) or decoder (last-real-token pooling); "
                          "read from the checkpoint's model_type when left out.")
    mode: Literal[tuple(MODES)] = Field("full", description="Tuning mode: " + ", ".join(MODES) + " (nikl_ray/modes/).")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha (scale = alpha / r); default lora_alpha_ratio × rank, "
                                                           "so the scale stays put while a search varies the rank.")
    lora_alpha_ratio: float = Field(2.0, gt=0, description="alpha = ratio × rank when lora_alpha is not given.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    lora_targets: list[str] | None = Field(None, description="Modules to adapt; per-architecture default when left out.")
    prompt_tokens: int = Field(20, ge=1, le=512, description="prompt mode: virtual tokens learned in front of every row.")
    prefix_tokens: int = Field(20, ge=1, le=512, description="prefix mode: key/value vectors learned in front of every layer.")
    prefix_projection: bool = Field(False, description="prefix mode: produce the prefix by a trained two-layer MLP "
                                                       "(Li & Liang's reparametrisation) instead of training it directly.")
    prefix_hidden: int | None = Field(None, ge=1, description="prefix mode with projection: the MLP's hidden size "
                                                              "(default the model's hidden size).")
    target_encoding: Literal["inline", "markers", "pair", "none"] = Field(
        "inline", description="inline: `<t1>` `<t2>` around the target at its own position in the text; "
                               "markers: `{text}<t1>{target}<t2>` (which occurrence is meant is lost); "
                               "pair: text and target as a sentence pair; none: text only. "
                               "The marker tokens are added as special tokens (embeddings resized).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per row after truncation.")
    batch_size: int = Field(16, ge=1, description="Per-device training batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lr: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(3, ge=1, le=100)
    early_stopping_patience: int = Field(2, ge=1, description="Epochs without a gain of the selection score (on the fold's selection slice) before stopping.")
    loss: Literal["auto", "bce", "asl", "ce"] = Field("auto", description="auto: BCE for multi-label, CE for single-label; "
                                                                         "bce or asl (asymmetric loss): multi-label only; ce: single-label only.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: bf16 on GPUs that have it, else fp16; fp32 on CPU.")
    gradient_checkpointing: bool | None = Field(None, description="Default: on for decoders on GPU (checkpointing_on).")
    seed: int = 42
    oom_retry: bool = Field(False, description="On out-of-memory, retry at half the batch size with twice the gradient "
                                               "accumulation (same effective batch), down to batch size 1.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint. Off unless you trust it.")
    params: float | None = Field(None, gt=0, description="Parameter count for the memory estimate; read from the config when left out.")
    pretrain: PretrainConfig | None = Field(None, description="Continue pretraining on unlabeled text first (`nikl-ray pretrain`).")
    # generate (QA) tasks
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="generate tasks: the longest answer generated "
                                                                         "(and trained on); default 64 there.")
    select_by: Literal["score", "loss"] = Field("score", description="generate tasks: choose the epoch by the task's "
                                                                     "metric on greedy answers to the selection slice, "
                                                                     "or by its loss on the reference answers (cheaper).")
    select_questions: int | None = Field(None, ge=1, description="generate tasks: answer at most this many selection "
                                                                 "questions per epoch (a fixed sample; default all).")
    retrieve: RetrieveConfig | None = Field(None, description="generate tasks: put the k nearest training items "
                                                              "(question and answer) into each prompt.")
    samples: int = Field(0, ge=0, le=16, description="generate tasks: sampled answers per question besides the greedy one "
                                                     "(each a candidate for the ensemble, with its mean token log-probability).")
    temperature: float = Field(0.8, gt=0, description="generate tasks: sampling temperature of `samples`.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"] | None = Field(
        None, description="Optimizer (default: HF Trainer's); paged_adamw_8bit (bitsandbytes) needs a GPU.")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, v: str) -> str:
        looks_local = v.startswith((".", "/", "~")) or Path(v).expanduser().exists() or v.count("/") > 1
        if looks_local and not (Path(v).expanduser() / "config.json").exists():
            raise ValueError(f"checkpoint directory {v!r} has no config.json (missing or not an HF checkpoint)")
        return v

    @model_validator(mode="after")
    def _fill_family(self) -> "BackboneSpec":
        if self.family is None:
            mt = self.model_type()
            if mt is None:
                raise ValueError(f"backbone {self.name}: give `family` (encoder|decoder); cannot read the checkpoint's model_type")
            self.family = "encoder" if mt in ENCODER_TYPES else "decoder"
        mode_of(self).check(self)
        return self

    def model_type(self) -> str | None:
        if self.checkpoint.startswith("tiny:"):  # built on first use (nikl_ray.tiny); kind = model_type
            return self.checkpoint.removeprefix("tiny:")
        cfg = Path(self.checkpoint).expanduser() / "config.json"
        return json.loads(cfg.read_text()).get("model_type") if cfg.exists() else None

    @property
    def uses_lora(self) -> bool:
        """LoRA adapters on named targets (lora, qlora, gptq: the modes with `lora` set)."""
        return mode_of(self).lora

    def checkpointing_on(self, gpu: bool) -> bool:
        """Whether training uses gradient checkpointing: as set, else on for decoders on a GPU (the
        one rule: the runs and the placement plan's memory estimate both ask here)."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return gpu and self.family == "decoder"

    @property
    def alpha(self) -> float:
        """The LoRA alpha in effect."""
        return float(self.lora_alpha) if self.lora_alpha is not None else self.lora_alpha_ratio * self.lora_r

    @property
    def objective(self) -> str:
        """The pretraining objective in effect."""
        return (self.pretrain.objective if self.pretrain and self.pretrain.objective
                else "mlm" if self.family == "encoder" else "clm")

    @property
    def uses_markers(self) -> bool:
        return self.target_encoding in ("inline", "markers")

    def resolved_lora_targets(self) -> list[str]:
        if self.lora_targets:
            return self.lora_targets
        mt = self.model_type()
        if mt not in DEFAULT_LORA_TARGETS:
            raise ValueError(f"backbone {self.name}: no default LoRA targets for model_type {mt!r}; set `lora_targets`")
        return DEFAULT_LORA_TARGETS[mt]


def quiet_transformers() -> None:
    """The per-load weight bars and "newly initialized head" reports are expected noise here, and so
    are transformers' own deprecations raised from inside peft and HF Trainer, and bitsandbytes'
    note on CPUs with AVX512-BF16 that an optional `kernels` package is missing (once per process
    that loads a model: every features task)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    # peft's prefix tuning hands a generating model its prefix as `past_key_values` beside the `cache`
    # transformers 5 keeps: it warns at every generated token, and the prefix is used as it should be
    warnings.filterwarnings("ignore", message="Both `past_key_values` and `cache` are set", category=FutureWarning)


def quiet_worker(needs_bitsandbytes: bool) -> None:
    """Before the heavy imports of a Train worker (its own process): drop warnings a user cannot act on
    (quiet_transformers), and bitsandbytes where the run does not quantize: peft imports it eagerly
    (2–4 s, most of it torch.compile machinery).
    """
    import sys

    if not needs_bitsandbytes and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # peft and transformers then see it as not installed
    quiet_transformers()


def load_tokenizer(spec: BackboneSpec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.checkpoint, trust_remote_code=spec.trust_remote_code)
    if tok.pad_token is None:  # many decoder checkpoints ship without one
        tok.pad_token = tok.eos_token
    if spec.uses_markers and MARKERS[0] not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    return with_padding_side(spec, tok)


def with_padding_side(spec: BackboneSpec, tok):
    """With virtual tokens the model sees embeddings, not ids, and its head reads the last position:
    the last real token must be there. Set on every load: a saved tokenizer does not always keep it."""
    if mode_of(spec).virtual_tokens:
        tok.padding_side = "left"
    return tok


def load_for_classification(spec: BackboneSpec, num_labels: int, multi_label: bool, tokenizer, *, precision: str = "fp32",
                            gradient_checkpointing: bool = False, adapter_dir: str | None = None):
    """The model to train (or, with `adapter_dir`, a trained adapter model to run) for `spec`'s mode.
    `precision` and `gradient_checkpointing` come resolved (runspec.Device.precision, checkpointing_on)."""
    from transformers import AutoModelForSequenceClassification

    return _load(AutoModelForSequenceClassification, "SEQ_CLS", spec, tokenizer, precision, gradient_checkpointing,
                 adapter_dir, num_labels=num_labels,
                 problem_type="multi_label_classification" if multi_label else "single_label_classification")


def load_for_generation(spec: BackboneSpec, tokenizer, *, precision: str = "fp32", gradient_checkpointing: bool = False,
                        adapter_dir: str | None = None):
    """The causal LM of a generate task to train (or, with `adapter_dir`, a trained adapter to run)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, "CAUSAL_LM", spec, tokenizer, precision, gradient_checkpointing, adapter_dir)


def _load(auto_class, task_type: str, spec: BackboneSpec, tokenizer, precision: str, gradient_checkpointing: bool,
          adapter_dir: str | None, **kwargs):
    import torch

    quiet_transformers()
    mode = mode_of(spec)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = auto_class.from_pretrained(spec.checkpoint, trust_remote_code=spec.trust_remote_code,
                                       pad_token_id=tokenizer.pad_token_id, **kwargs, **mode.load_kwargs(spec, dtype))
    mode.after_load(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # marker tokens added (padded vocabularies stay)
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if not mode.adapter:
        return model
    model = mode.prepare(model, gradient_checkpointing)
    if adapter_dir is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir)
    return mode.adapt(model, spec, tokenizer, task_type)


def load_trained(spec: BackboneSpec, checkpoint_dir: str | Path, num_labels: int, multi_label: bool, *,
                 precision: str = "fp32"):
    """(tokenizer, model in eval mode) of a trained fold checkpoint: the full model, or base + adapter."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    tokenizer = trained_tokenizer(spec, checkpoint_dir)
    if mode_of(spec).adapter:
        model = load_for_classification(spec, num_labels, multi_label, tokenizer, precision=precision,
                                        adapter_dir=str(checkpoint_dir))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint_dir)
    return tokenizer, model.eval()


def trained_tokenizer(spec: BackboneSpec, checkpoint_dir: str | Path):
    """The tokenizer a fold checkpoint was saved with (its marker tokens included), padding as it trained."""
    from transformers import AutoTokenizer

    return with_padding_side(spec, AutoTokenizer.from_pretrained(checkpoint_dir))


def load_trained_generator(spec: BackboneSpec, checkpoint_dir: str | Path, *, precision: str = "fp32"):
    """(tokenizer, causal LM in eval mode) of a trained generate-task fold checkpoint; the tokenizer
    pads on the left, as batched generation needs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    tokenizer.padding_side = "left"
    if mode_of(spec).adapter:
        model = load_for_generation(spec, tokenizer, precision=precision, adapter_dir=str(checkpoint_dir))
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    return tokenizer, model.eval()


def count_params(spec: BackboneSpec) -> float:
    """Parameter count of the checkpoint's architecture, built on the meta device (no weights read)."""
    if spec.params:
        return spec.params
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(spec.checkpoint, trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=spec.trust_remote_code)
    return float(sum(p.numel() for p in model.parameters()))
