"""`prompt`: peft prompt tuning (decoders): `prompt_tokens` virtual token embeddings learned in
front of every row, and the classification head; the model itself stays frozen. (peft's prefix
tuning needs a `past_key_values` argument that transformers 5's GPT-NeoX no longer has.)"""

from __future__ import annotations

from nikl_ray.modes.base import MemoryTerms, Mode


class Prompt(Mode):
    name = "prompt"
    virtual_tokens = True
    search_space = "prompt"

    def memory_knobs(self, spec) -> dict:
        return {"prompt_tokens": spec.prompt_tokens}

    def memory_terms(self, shape, *, lora_r, lora_targets, prompt_tokens) -> MemoryTerms:
        # a frozen 16-bit model; the virtual tokens lengthen every row
        return MemoryTerms(shape.params * 2, prompt_tokens * shape.hidden, prompt_tokens)

    def adapt(self, model, spec, tokenizer):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        return get_peft_model(model, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=spec.prompt_tokens))

    def check(self, spec) -> None:
        if spec.family != "decoder":
            raise ValueError(f"backbone {spec.name}: mode prompt is for decoders (an encoder pools its first token, "
                             "which would be a virtual one)")


MODE = Prompt()
