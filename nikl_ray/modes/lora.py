"""`lora`: peft LoRA adapters on a frozen base, 16-bit on a GPU and 32-bit on a CPU."""

from __future__ import annotations

from nikl_ray.modes.base import MemoryTerms, Mode


class Lora(Mode):
    name = "lora"
    lora = True

    def memory_knobs(self, spec) -> dict:
        return {"lora_r": spec.lora_r, "lora_targets": spec.resolved_lora_targets()}

    def base_bytes(self, shape) -> float:
        return shape.params * 2  # the frozen base in 16-bit

    def memory_terms(self, shape, *, lora_r, lora_targets, prompt_tokens, **_) -> MemoryTerms:
        from nikl_ray.placement import lora_params

        return MemoryTerms(self.base_bytes(shape), lora_params(shape, lora_targets or ["query", "value"], lora_r))

    def load_kwargs(self, spec, dtype) -> dict:
        import torch

        return {} if dtype == torch.float32 else {"dtype": dtype}  # trainable adapters stay fp32 under peft

    def adapt(self, model, spec, tokenizer, task_type: str = "SEQ_CLS"):
        from peft import LoraConfig, get_peft_model

        from nikl_ray.backbones import MARKERS

        marker_ids = [tokenizer.convert_tokens_to_ids(m) for m in MARKERS] if spec.uses_markers else None
        config = LoraConfig(task_type=task_type, r=spec.lora_r, lora_alpha=spec.alpha,
                            lora_dropout=spec.lora_dropout, target_modules=spec.resolved_lora_targets(),
                            # the marker tokens' embedding rows are new: train (and save) just those rows
                            trainable_token_indices=marker_ids)
        return get_peft_model(model, config)


class KbitLora(Lora):
    """LoRA on a quantized base (qlora, gptq): peft's k-bit preparation, embeddings kept in fp32."""

    def base_bytes(self, shape) -> float:
        embed = shape.vocab * shape.hidden
        # ~0.56 byte/param for 4-bit with double quantization; k-bit training keeps the embeddings in fp32
        return (shape.params - embed) * 0.5625 + embed * 4

    def prepare(self, model, gradient_checkpointing: bool):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


MODE = Lora()
