"""`full`: every weight trains (encoders such as KoELECTRA, KLUE-RoBERTa); the whole model is saved."""

from __future__ import annotations

from nikl_ray.modes.base import MemoryTerms, Mode


class Full(Mode):
    name = "full"
    adapter = False
    search_space = "full"

    def memory_terms(self, shape, *, lora_r, lora_targets, prompt_tokens, **_) -> MemoryTerms:
        return MemoryTerms(shape.params * 4, shape.params)  # fp32 weights, all trainable


MODE = Full()
