"""`prefix`: peft prefix tuning (Li & Liang 2021) for generate (causal-LM) tasks: `prefix_tokens`
learned key/value vectors in front of every layer's attention; the model stays frozen. With
`prefix_projection` the prefix is produced by a two-layer MLP (hidden `prefix_hidden`) that is
trained instead, as the paper does for stability; without it the vectors train directly.

Classification has no prefix mode: peft's sequence-classification wrapper passes a
`past_key_values` argument that transformers 5's heads no longer take (use `prompt` there).
"""

from __future__ import annotations

from nikl_ray.modes.base import MemoryTerms, Mode


class Prefix(Mode):
    name = "prefix"
    generate_only = True
    search_space = "prefix"

    def memory_knobs(self, spec) -> dict:
        return {"prefix_tokens": spec.prefix_tokens,
                "prefix_hidden": (spec.prefix_hidden or 0) if spec.prefix_projection else None}

    def memory_terms(self, shape, *, lora_r, lora_targets, prompt_tokens, prefix_tokens=0, prefix_hidden=None, **_):
        per_token = 2 * shape.layers * shape.hidden  # a key and a value vector per layer
        trainable = prefix_tokens * per_token
        if prefix_hidden is not None:  # the MLP: embedding, hidden layer, output to every layer's key/value
            width = prefix_hidden or shape.hidden
            trainable = prefix_tokens * shape.hidden + shape.hidden * width + width * per_token
        # a frozen 16-bit model; the prefix lengthens every layer's attention
        return MemoryTerms(shape.params * 2, trainable, prefix_tokens)

    def adapt(self, model, spec, tokenizer, task_type: str = "CAUSAL_LM"):
        from peft import PrefixTuningConfig, get_peft_model

        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=spec.prefix_tokens,
                                    prefix_projection=spec.prefix_projection,
                                    encoder_hidden_size=spec.prefix_hidden or model.config.hidden_size)
        return get_peft_model(model, config)

    def check(self, spec) -> None:
        if spec.family != "decoder":
            raise ValueError(f"backbone {spec.name}: mode prefix is for decoders (generate tasks)")


MODE = Prefix()
