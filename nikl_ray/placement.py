"""How many trials share one card: a memory estimate per backbone, turned into a GPU share.

Ray's fractional GPUs are a scheduling promise only; the worker also caps itself with
`torch.cuda.set_per_process_memory_fraction(share)`. Shares are always 1/k (k trials per
card), because Ray adds fractions across the whole cluster: a share that does not tile one card
can place more trials than fit on any single card (ray-project/ray#5902).

The estimate (bytes), for one training process:
- frozen or trained weights at their precision (fp32 for full fine-tuning; 16-bit for LoRA on a
  GPU; ~0.56 byte/param for 4-bit NF4 with double quantization, embeddings kept in 16-bit),
- trainable parameters × 16 bytes (fp32 weight, grad, two Adam moments),
- activations: per layer s·b·h·(34 + 5·a·s/h) bytes at 16-bit (Korthikanti et al., 2022),
  about 2·s·b·h per layer with gradient checkpointing plus one layer in full,
- a fixed 1 GiB for the CUDA context and allocator slack, then a 10% margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1024**3

# (in, out) of each LoRA target in units of (hidden, intermediate); default (h, h).
_TARGET_SHAPES = {
    "query_key_value": ("h", "3h"), "dense_h_to_4h": ("h", "i"), "dense_4h_to_h": ("i", "h"),
    "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h"),
}


@dataclass(frozen=True)
class ModelShape:
    params: float
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config, params: float) -> "ModelShape":
        get = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None)), default)  # noqa: E731
        hidden = get("hidden_size", "n_embd", "d_model")
        return cls(params=params, hidden=hidden, layers=get("num_hidden_layers", "n_layer"),
                   heads=get("num_attention_heads", "n_head"), intermediate=get("intermediate_size", "n_inner", default=4 * hidden),
                   vocab=get("vocab_size"))


def lora_params(shape: ModelShape, targets: list[str], r: int) -> float:
    dims = {"h": shape.hidden, "3h": 3 * shape.hidden, "i": shape.intermediate}
    per_layer = sum(r * (dims[a] + dims[b]) for a, b in (_TARGET_SHAPES.get(t, ("h", "h")) for t in targets))
    return float(per_layer * shape.layers)


def estimate_memory_bytes(shape: ModelShape, *, mode: str, batch_size: int, max_length: int,
                          lora_r: int = 16, lora_targets: list[str] | None = None,
                          gradient_checkpointing: bool = False) -> float:
    embed = shape.vocab * shape.hidden
    if mode == "full":
        weights, trainable = shape.params * 4, shape.params
    else:
        body = shape.params - embed
        weights = (body * 0.5625 + embed * 2) if mode in ("qlora", "gptq") else shape.params * 2
        trainable = lora_params(shape, lora_targets or ["query", "value"], lora_r)
    s, b, h, a, L = max_length, batch_size, shape.hidden, shape.heads, shape.layers
    per_layer = s * b * h * (34 + 5 * a * s / h)
    activations = (2 * s * b * h * L + per_layer) if gradient_checkpointing else per_layer * L
    return (weights + trainable * 16 + activations + 1 * GiB) * 1.10


@dataclass(frozen=True)
class Placement:
    """Resources for one trial. On GPU: gpu_share = 1/trials_per_card; on CPU: gpu_share = 0."""

    name: str
    estimate_gb: float
    trials_per_card: int
    gpu_share: float
    cpus: float

    def resources(self) -> dict:
        return {"CPU": self.cpus, "GPU": self.gpu_share} if self.gpu_share else {"CPU": self.cpus}


def place(name: str, estimate_bytes: float, *, card_gb: float = 24.0, use_gpu: bool, cpus: float = 1.0,
          max_trials_per_card: int = 8) -> Placement:
    est_gb = estimate_bytes / GiB
    if not use_gpu:
        return Placement(name, est_gb, 0, 0.0, cpus)
    if est_gb > card_gb:
        raise ValueError(f"backbone {name}: estimated {est_gb:.1f} GB does not fit a {card_gb:g} GB card; "
                         "lower batch_size/max_length, use qlora, or turn on gradient_checkpointing")
    k = max(1, min(max_trials_per_card, math.floor(card_gb / est_gb)))
    return Placement(name, est_gb, k, 1.0 / k, cpus)


def format_plan(placements: list[Placement], *, card_gb: float, total_cpus: float, total_gpus: float) -> str:
    lines = ["placement plan:"]
    for p in placements:
        if p.gpu_share:
            lines.append(f"  {p.name:<24} ~{p.estimate_gb:5.1f} GB → {p.trials_per_card} trial(s) per {card_gb:g} GB card "
                         f"(GPU share {p.gpu_share:.3f}, {p.cpus:g} CPU)")
        else:
            at_once = int(total_cpus // p.cpus) if p.cpus else 0
            lines.append(f"  {p.name:<24} CPU mode: {p.cpus:g} CPU per trial → {at_once} at once on {total_cpus:g} CPUs "
                         f"(GPU estimate ~{p.estimate_gb:.1f} GB)")
    return "\n".join(lines)
