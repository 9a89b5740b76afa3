"""`prompt`: peft prompt tuning (decoders): `prompt_tokens` virtual token embeddings learned in
front of every row, and the classification head; the model itself stays frozen. (For
classification it stands in for prefix tuning, which peft runs only for causal LMs here: its
sequence-classification wrapper passes a `past_key_values` argument that transformers 5's heads
call `cache`. Generate tasks have `prefix`, nikl_ray/modes/prefix.py.)"""

from __future__ import annotations

from nikl_ray.modes.base import MemoryTerms, Mode


class Prompt(Mode):
    name = "prompt"
    virtual_tokens = True
    search_space = "prompt"

    def memory_knobs(self, spec) -> dict:
        return {"prompt_tokens": spec.prompt_tokens}

    def memory_terms(self, shape, *, lora_r, lora_targets, prompt_tokens, **_) -> MemoryTerms:
        # a frozen 16-bit model; the virtual tokens lengthen every row
        return MemoryTerms(shape.params * 2, prompt_tokens * shape.hidden, prompt_tokens)

    def adapt(self, model, spec, tokenizer, task_type: str = "SEQ_CLS"):
        from peft import PromptTuningConfig, get_peft_model

        return get_peft_model(model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=spec.prompt_tokens))

    def check(self, spec) -> None:
        if spec.family != "decoder":
            raise ValueError(f"backbone {spec.name}: mode prompt is for decoders (an encoder pools its first token, "
                             "which would be a virtual one)")


MODE = Prompt()
