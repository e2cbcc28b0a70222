"""Memba's PEFT modules: LoRA on the projections and the membrane gate."""
from .builder import build_gate, wrap_lora
from .config import GateConfig, LoRAConfig, PEFTConfig, parse_peft
from .freeze import freeze_all_but_peft, is_peft_param
from .lora import LoRALinear
from .membrane_gate import MembraneGate

__all__ = ['LoRALinear', 'MembraneGate', 'PEFTConfig', 'LoRAConfig', 'GateConfig',
           'parse_peft', 'freeze_all_but_peft', 'is_peft_param', 'wrap_lora', 'build_gate']
