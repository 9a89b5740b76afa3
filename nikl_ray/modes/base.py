"""What every tuning mode says about itself; each mode module overrides what differs.

A mode is one unit of: how its model loads (`load_kwargs`, `after_load`, `prepare`), what trains
(`adapt`), what a saved fold checkpoint holds (`adapter`), its terms in the device-memory
estimate (`memory_terms`), and the few flags other code asks (bitsandbytes, virtual tokens, the
default search space). The table in `nikl_ray.modes` dispatches them by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryTerms:
    """A mode's share of placement.estimate_memory_bytes: weights (bytes, at their precision),
    trainable parameters (each costs 16 bytes: fp32 weight, gradient, two Adam moments) and tokens
    added in front of every row (they lengthen the activations)."""

    weights_bytes: float
    trainable_params: float
    extra_tokens: int = 0


class Mode:
    name: str = ""
    adapter = True  # only an adapter (and the head, and marker-token rows) trains and is saved
    lora = False  # LoRA adapters on named target modules
    needs_bitsandbytes = False  # loads through bitsandbytes (kept out of workers that do not)
    virtual_tokens = False  # learned embeddings in front of every row: left padding, decoders only
    search_space = "lora"  # the default search space: search_spaces/<family>_<this>.yaml
    generate_only = False  # causal-LM (QA) tasks only

    def memory_knobs(self, spec) -> dict:
        """The spec's values that memory_terms reads (keyword arguments of estimate_memory_bytes)."""
        return {}

    def memory_terms(self, shape, *, lora_r: int, lora_targets: list[str] | None, prompt_tokens: int,
                     prefix_tokens: int = 0, prefix_hidden: int | None = None) -> MemoryTerms:
        raise NotImplementedError

    def load_kwargs(self, spec, dtype) -> dict:
        """Extra `from_pretrained` arguments (`dtype` is the resolved torch dtype)."""
        return {}

    def after_load(self, model) -> None:
        """Adjust the loaded base model in place."""

    def prepare(self, model, gradient_checkpointing: bool):
        """The base as the adapter sits on it (also when a trained adapter is loaded back)."""
        return model

    def adapt(self, model, spec, tokenizer, task_type: str = "SEQ_CLS"):
        """The model to train: the base with this mode's trainable part (peft's `task_type`:
        SEQ_CLS for classification, CAUSAL_LM for generate tasks)."""
        return model

    def check(self, spec) -> None:
        """Raise ValueError when `spec` cannot use this mode."""

    def __repr__(self) -> str:
        return f"<mode {self.name}>"
