"""Which parameters a PEFT backbone trains: the PEFT modules' tensors, found by name."""
import torch.nn as nn

__all__ = ['PEFT_MODULE_NAMES', 'freeze_all_but_peft', 'is_peft_param']

# the attribute names the PEFT modules are registered under
PEFT_MODULE_NAMES = frozenset({
    'lora_down', 'lora_up',          # LoRALinear, MergedLoRALinear, LoRAConv2d
    'gate',                          # MembraneGate
    'adapter_down', 'adapter_up',    # ParallelAdapter
    'delta',                         # TensorDeltas (partial tuning)
    'extra_scan',                    # AdditionalScan
    'affix', 'prompt',               # LearnedTokens
})


def is_peft_param(name: str) -> bool:
    """True for a parameter of a PEFT module (e.g. ``layers.0.mixer.in_proj.lora_up.weight``)."""
    return not PEFT_MODULE_NAMES.isdisjoint(name.split('.'))


def freeze_all_but_peft(module: nn.Module) -> None:
    """requires_grad=False everywhere except the PEFT modules' parameters."""
    for name, p in module.named_parameters():
        p.requires_grad_(is_peft_param(name))
