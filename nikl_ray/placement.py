"""How many trials share one card: a memory estimate per backbone, turned into a GPU share and a cap.

A trial's footprint on a card is what PyTorch's allocator holds at its peak (estimated below)
plus what the process holds outside the allocator: the CUDA context, cuBLAS workspaces and
allocator slack, reserved as `CONTEXT_GB` per process: on an H200 (torch 2.11 / CUDA 13) a
`nikl-ray pipeline --local` run saw ≈ 1.15 GB per process beside torch's peak, and
`benchmarks/gpu_packing.py` 0.97–1.03 GB (NVML peak − torch peak; benchmarks/README.md). The
benchmark measures it again on any card.

`card_gb` is a *budget per card*; by default the smallest card the cluster reports. With k
trials per card (share 1/k: Ray adds fractions across the whole cluster, so a share that does
not tile one card can place more trials than fit on any one card, ray-project/ray#5902), each
trial's allocator is capped at `(budget / k − CONTEXT_GB) / physical card memory` with
`torch.cuda.set_per_process_memory_fraction` (a fraction of the *physical* card, and blind to
the context; applied in each process by `cap_memory`). So a 24 GB plan exercised on an 80 GB card
keeps every trial inside what it would have on a 24 GB one.

The allocator estimate (bytes), for one training process:
- weights at their precision and the trainable parameters × 16 bytes (fp32 weight, gradient, two
  Adam moments), each tuning mode's own terms (`Mode.memory_terms` in nikl_ray/modes/),
- activations: 34·s·b·h bytes per layer at 16-bit (Korthikanti et al., 2022, without the
  attention-score term that SDPA attention never materialises), or about 2·s·b·h per layer
  with gradient checkpointing plus one layer in full,
- generate tasks: the KV cache of answering a batch at `max_new_tokens`,
- then a 10% margin.
Measured against it on an H200 (torch's peak allocated): RoBERTa-base full FT at 32 × 128 peaked
at 2.58 GB in that pipeline run and 2.40 GB in `benchmarks/gpu_packing.py` (estimate 3.6 GB); a
1.3B GPT-NeoX in QLoRA r=64 at 8 × 128 at 1.90 GB in both (estimate 2.0 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nikl_ray.modes import mode_of

GiB = 1024**3
CONTEXT_GB = 1.25  # per process, outside the allocator (see the module docstring)

# (in, out) of each LoRA target in units of (hidden, intermediate); default (h, h).
_TARGET_SHAPES = {
    "query_key_value": ("h", "3h"), "dense_h_to_4h": ("h", "i"), "dense_4h_to_h": ("i", "h"),
    "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h"),
}


class PlacementError(ValueError):
    pass


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
                          gradient_checkpointing: bool = False, prompt_tokens: int = 0, prefix_tokens: int = 0,
                          prefix_hidden: int | None = None, generate_tokens: int = 0) -> float:
    """Peak bytes PyTorch's allocator holds while training (the CUDA context is not included).
    A generate task's run also answers its selection slice each epoch with the optimizer's state
    held: `generate_tokens` (max_new_tokens) adds the KV cache of one evaluation batch (twice the
    training batch) at prompt + answer length, keys and values of every layer in 16-bit."""
    terms = mode_of(mode).memory_terms(shape, lora_r=lora_r, lora_targets=lora_targets, prompt_tokens=prompt_tokens,
                                       prefix_tokens=prefix_tokens, prefix_hidden=prefix_hidden)
    s, b, h, L = max_length + terms.extra_tokens, batch_size, shape.hidden, shape.layers
    per_layer = 34 * s * b * h
    activations = (2 * s * b * h * L + per_layer) if gradient_checkpointing else per_layer * L
    kv_cache = 2 * L * h * (s + generate_tokens) * (2 * b) * 2 if generate_tokens else 0
    return (terms.weights_bytes + terms.trainable_params * 16 + activations + kv_cache) * 1.10


def is_oom(e: BaseException) -> bool:
    """Whether `e` says the device (or the host) ran out of memory."""
    import torch

    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def cap_memory(fraction: float | None, device: str) -> None:
    """Keep this process's allocator inside its planned share of the card (Placement.memory_fraction):
    Ray's fractional GPU only schedules. Called by every process that runs a model on a card (a
    Train worker, a features task, a head task)."""
    if device != "cuda" or not fraction:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)


@dataclass(frozen=True)
class Placement:
    """Resources for one trial. On GPU: gpu_share = 1/trials_per_card; on CPU: gpu_share = 0."""

    name: str
    estimate_gb: float | None  # allocator peak (None: not estimated, a CPU trial)
    trials_per_card: int
    gpu_share: float
    cpus: float
    memory_fraction: float | None = None  # the allocator cap, as a fraction of the physical card

    @property
    def per_trial_gb(self) -> float:
        return self.estimate_gb + CONTEXT_GB

    def resources(self) -> dict:
        return {"CPU": self.cpus, "GPU": self.gpu_share} if self.gpu_share else {"CPU": self.cpus}


def place(name: str, estimate_bytes: float | None, *, budget_gb: float | None, physical_gb: float | None = None,
          use_gpu: bool, cpus: float = 1.0, max_trials_per_card: int = 8) -> Placement:
    """k = how many trials fit one card's budget (context included), capped by max_trials_per_card.
    Without GPUs only CPUs are placed: a CPU trial carries no memory estimate (callers may pass None)."""
    if not use_gpu:
        return Placement(name, None, 0, 0.0, cpus)
    est_gb = estimate_bytes / GiB
    if budget_gb is None:
        raise PlacementError(f"backbone {name}: no card memory known: set resources.card_gb")
    per_trial = est_gb + CONTEXT_GB
    if per_trial > budget_gb:
        found = f"; the card found has {physical_gb:.1f} GB" if physical_gb else ""
        raise PlacementError(f"backbone {name}: needs ~{per_trial:.1f} GB ({est_gb:.1f} GB estimated + {CONTEXT_GB:g} GB "
                             f"CUDA context) and does not fit a {budget_gb:g} GB card budget{found}; lower batch_size or "
                             "max_length, use qlora, or turn on gradient_checkpointing")
    k = max(1, min(max_trials_per_card, math.floor(budget_gb / per_trial)))
    physical = physical_gb or budget_gb
    cap = (budget_gb / k - CONTEXT_GB) / physical
    return Placement(name, est_gb, k, 1.0 / k, cpus, cap)


def slots_for(p: Placement, cpus: float, gpus: float) -> int:
    """How many runs of this placement the cluster holds at once."""
    by_cpu = int(cpus // p.cpus)
    return max(1, by_cpu if not p.gpu_share else min(by_cpu, int(round(gpus * p.trials_per_card))))


def concurrent_slots(placements: list[Placement], cpus: float, gpus: float) -> int:
    """How many runs to have submitted at once: as many as the roomiest backbone fits on the cluster
    (Ray queues the others until their share is free; more would only start idle controllers)."""
    return max(slots_for(p, cpus, gpus) for p in placements)


def format_plan(placements: list[Placement], *, budget_gb: float | None, physical_gb: float | None, total_cpus: float,
                total_gpus: float) -> str:
    if not total_gpus or not any(p.gpu_share for p in placements):
        lines = [f"placement plan (CPU mode: {total_cpus:g} CPUs, no GPU):"]
        for p in placements:
            lines.append(f"  {p.name:<24} {p.cpus:g} CPU per trial → {max(1, int(total_cpus // p.cpus))} at once")
        return "\n".join(lines)
    card = f"{budget_gb:g} GB budget per card" + (f" (card found: {physical_gb:.1f} GB)" if physical_gb else "")
    lines = [f"placement plan ({total_gpus:g} GPU(s), {card}, {CONTEXT_GB:g} GB CUDA context reserved per process):"]
    for p in placements:
        cap = f"allocator cap {p.memory_fraction * (physical_gb or budget_gb):.1f} GB" if p.memory_fraction else ""
        lines.append(f"  {p.name:<24} ~{p.per_trial_gb:4.1f} GB ({p.estimate_gb:.1f} GB allocator + {CONTEXT_GB:g} GB context) "
                     f"→ {p.trials_per_card} trial(s) per card (GPU share {p.gpu_share:.3f}, {cap}, {p.cpus:g} CPU)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- planning a stage
@dataclass(frozen=True)
class Card:
    """One GPU as its node reports it (cuda False: a card Ray advertises that torch cannot see)."""

    node: str
    name: str
    total_gb: float | None
    cuda: bool
    bf16: bool = False


@dataclass(frozen=True)
class ClusterShape:
    cpus: float
    gpus: float
    cards: tuple[Card, ...] = ()
    nodes: int = 1

    @property
    def physical_gb(self) -> float | None:
        """The smallest card found (None where no node could read its cards)."""
        sizes = [c.total_gb for c in self.cards if c.total_gb]
        return min(sizes) if sizes else None

    def budget_gb(self, card_gb: float | None) -> float | None:
        return card_gb if card_gb is not None else self.physical_gb


def estimate_for(spec, device) -> float:
    """The allocator estimate (bytes) of training `spec` on a card (`device`, a runspec.Device: a simulated
    GPU cluster is planned as a real one, so its checkpointing is that of a GPU run)."""
    from transformers import AutoConfig

    from nikl_ray.backbones import count_params

    config = AutoConfig.from_pretrained(spec.checkpoint, trust_remote_code=spec.trust_remote_code)
    shape = ModelShape.from_config(config, count_params(spec))
    return estimate_memory_bytes(shape, mode=spec.mode, batch_size=spec.batch_size, max_length=spec.max_length,
                                 gradient_checkpointing=spec.checkpointing_on(gpu=True), generate_tokens=spec.max_new_tokens or 0,
                                 **mode_of(spec).memory_knobs(spec))


def plan(specs: list, resources, shape: ClusterShape, device) -> dict[str, Placement]:
    """A placement per backbone, for the cluster `shape` (`resources` is the experiment's ResourcesConfig).
    Refuses, before anything starts, a backbone that fits no card."""
    budget = shape.budget_gb(resources.card_gb)
    try:
        # on CPUs nothing needs the device-memory estimate (it builds each model's skeleton: seconds)
        return {s.name: place(s.name, estimate_for(s, device) if device.schedule_gpu else None, budget_gb=budget,
                              physical_gb=shape.physical_gb,
                              use_gpu=device.schedule_gpu, cpus=resources.cpus_per_trial,
                              max_trials_per_card=resources.max_trials_per_card) for s in specs}
    except PlacementError as e:
        cards = sorted({f"{c.name}" + (f" ({c.total_gb:.1f} GB)" if c.total_gb else " (memory unknown)") for c in shape.cards})
        raise PlacementError(f"{e} [cards found: {len(shape.cards)} × {', '.join(cards) or 'none'}]") from None
