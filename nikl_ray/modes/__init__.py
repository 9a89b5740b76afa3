"""The tuning modes, one module each, dispatched by name (as peft's `dispatch_*` lists are).

Adding a mode is a module defining `MODE` (a `base.Mode`) and one line in MODES.
"""

from __future__ import annotations

from nikl_ray.modes import full, gptq, lora, prefix, prompt, qlora
from nikl_ray.modes.base import MemoryTerms, Mode

MODES: dict[str, Mode] = {m.name: m for m in (full.MODE, lora.MODE, qlora.MODE, gptq.MODE, prompt.MODE, prefix.MODE)}


def mode_of(spec_or_name) -> Mode:
    """The mode unit of a BackboneSpec (or of a mode name)."""
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.mode
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown tuning mode {name!r}: one of {', '.join(MODES)}") from None


__all__ = ["MODES", "MemoryTerms", "Mode", "mode_of"]
