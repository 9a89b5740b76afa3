"""`gptq`: a GPTQ-quantized checkpoint loaded by transformers' own GPTQ support, LoRA on top."""

from __future__ import annotations

from nikl_ray.modes.lora import KbitLora


class Gptq(KbitLora):
    name = "gptq"

    def load_kwargs(self, spec, dtype) -> dict:
        from transformers.utils import is_gptqmodel_available, is_optimum_available

        if not (is_gptqmodel_available() and is_optimum_available()):
            raise RuntimeError(f"backbone {spec.name}: mode gptq needs a GPTQ backend: pip install optimum gptqmodel")
        return super().load_kwargs(spec, dtype)  # the unquantized parts in 16-bit on a GPU


MODE = Gptq()
