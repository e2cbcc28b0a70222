"""PEFT methods, each a small module composed through the backbones' ``peft=dict(...)``."""
from .adapter import ParallelAdapter
from .additional_scan import AdditionalScan
from .builder import (build_gate, check_supported, wrap_embed, wrap_in_proj, wrap_merged,
                      wrap_out_proj)
from .config import (AdapterConfig, AdditionalScanConfig, AffixConfig, GateConfig, LoRAConfig,
                     PartialConfig, PEFTConfig, PromptConfig, parse_peft)
from .freeze import PEFT_MODULE_NAMES, freeze_all_but_peft, is_peft_param
from .lora import LoRAConv2d, LoRALinear, MergedLoRALinear
from .membrane_gate import MembraneGate
from .partial import TensorDeltas, shift
from .tokens import LearnedTokens

__all__ = ['LoRALinear', 'MergedLoRALinear', 'LoRAConv2d', 'MembraneGate', 'ParallelAdapter',
           'AdditionalScan', 'TensorDeltas', 'LearnedTokens', 'PEFTConfig', 'LoRAConfig',
           'GateConfig', 'AdapterConfig', 'AdditionalScanConfig', 'AffixConfig', 'PromptConfig',
           'PartialConfig', 'parse_peft', 'freeze_all_but_peft', 'is_peft_param',
           'PEFT_MODULE_NAMES', 'wrap_in_proj', 'wrap_out_proj', 'wrap_merged', 'wrap_embed',
           'build_gate', 'check_supported', 'shift']
