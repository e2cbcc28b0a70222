"""Which parameters a PEFT backbone trains."""
import torch.nn as nn

from .lora import LoRALinear
from .membrane_gate import MembraneGate

__all__ = ['freeze_all_but_peft', 'is_peft_param']


def is_peft_param(name: str) -> bool:
    """True for LoRA (lora_down/lora_up) and gate projection parameter names."""
    parts = name.split('.')
    return 'lora_down' in parts or 'lora_up' in parts or 'gate' in parts


def freeze_all_but_peft(module: nn.Module) -> None:
    """requires_grad=False everywhere except LoRA A/B and MembraneGate projections."""
    module.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.lora_down.requires_grad_(True)
            m.lora_up.requires_grad_(True)
        elif isinstance(m, MembraneGate):
            m.requires_grad_(True)
