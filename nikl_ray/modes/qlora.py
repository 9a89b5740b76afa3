"""`qlora`: the base loaded in 4-bit NF4 (double quantization) by bitsandbytes, LoRA on top."""

from __future__ import annotations

from nikl_ray.modes.lora import KbitLora


class Qlora(KbitLora):
    name = "qlora"
    needs_bitsandbytes = True

    def load_kwargs(self, spec, dtype) -> dict:
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)}

    def after_load(self, model) -> None:
        fp32_4bit_on_cpu(model)


def fp32_4bit_on_cpu(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights the first time it runs
    in eval mode without grad, and from then on runs it through a bf16 kernel (training too, until a
    save unpacks them): a fold model's numbers would depend on the CPU and on which layers were
    repacked when. Keep 4-bit layers on CPU on the fp32 path, as machines without AVX512-BF16 run
    them (GPUs are not affected: the flag is read for CPU inputs only)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


MODE = Qlora()
