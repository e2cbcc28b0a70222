"""The backbones' single ``peft=dict(...)`` argument, parsed and validated.

    peft=dict(lora=dict(in_proj=32, out_proj=96),
              gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=True))

``lora`` ranks of 0/None leave that projection plain; a missing ``gate`` means no
membrane gate. ``peft=None`` is the plain model.
"""
from dataclasses import dataclass, fields
from typing import Optional

__all__ = ['LoRAConfig', 'GateConfig', 'PEFTConfig', 'parse_peft']


@dataclass(frozen=True)
class LoRAConfig:
    in_proj: Optional[int] = None
    out_proj: Optional[int] = None
    scale: float = 0.1
    dropout: float = 0.1


@dataclass(frozen=True)
class GateConfig:
    rank: int = 16
    num_chunks: int = 4
    leak: float = 0.5
    threshold: float = 1.0
    transfer: bool = True
    residual: bool = True


@dataclass(frozen=True)
class PEFTConfig:
    lora: Optional[LoRAConfig] = None
    gate: Optional[GateConfig] = None

    def lora_rank(self, layer: str) -> Optional[int]:
        """LoRA rank for 'in_proj' / 'out_proj', or None for a plain layer."""
        return (getattr(self.lora, layer) or None) if self.lora is not None else None


def _build(cls, cfg, where: str):
    if not isinstance(cfg, dict):
        raise TypeError(f'{where} must be a dict, got {type(cfg).__name__}')
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        raise KeyError(f'{where}: unknown key {unknown[0]!r} (valid keys: {", ".join(valid)})')
    return cls(**cfg)


def parse_peft(peft) -> Optional[PEFTConfig]:
    """dict (or ConfigDict) -> PEFTConfig; None -> None. Unknown keys are errors."""
    if peft is None or isinstance(peft, PEFTConfig):
        return peft
    peft = dict(peft)
    cfg = _build(PEFTConfig, peft, 'peft')
    lora = _build(LoRAConfig, dict(cfg.lora), 'peft.lora') if cfg.lora is not None else None
    gate = _build(GateConfig, dict(cfg.gate), 'peft.gate') if cfg.gate is not None else None
    return PEFTConfig(lora=lora, gate=gate)
