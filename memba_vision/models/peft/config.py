"""The backbones' single ``peft=...`` argument, parsed and validated.

Each PEFT method is one key with its own dataclass; keys combine::

    peft=dict(lora=dict(in_proj=32, out_proj=96),                       # Memba
              gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=True))
    peft=dict(lora=dict(in_proj_x=64))                                  # LoRAp(X)
    peft=dict(partial=dict(A_log=True))                                 # A-tuning
    peft=dict(affix=dict(tokens=3, projection=True))                    # Affix-tuning

``peft=None`` (or ``'full'``) trains everything; ``'linear'`` (or ``{}``, ``dict()``)
freezes the whole backbone (linear probing). With any other value only the
method's tensors train. LoRA ranks of 0/None leave that layer plain.
"""
from dataclasses import dataclass, fields
from typing import Optional

__all__ = ['LoRAConfig', 'GateConfig', 'AdapterConfig', 'AdditionalScanConfig', 'AffixConfig',
           'PromptConfig', 'PartialConfig', 'PEFTConfig', 'parse_peft']


@dataclass(frozen=True)
class LoRAConfig:
    """Ranks of s * up(dropout(down(x))) branches (up zero-initialised).

    in_proj / out_proj: the whole layer. in_proj_x / in_proj_z: LoRAp, only the
    x half (conv and SSM input) or the z half (the gate) of in_proj's outputs.
    x_proj / x_proj_B / dt_proj: merged into the weight (W + s * up @ down, no
    dropout), one pair per scan direction; x_proj_B touches only x_proj's B rows.
    embed: a low-rank conv beside the patch embedding (k x k stride k to ``embed``
    channels, then 1x1).
    """
    in_proj: Optional[int] = None
    out_proj: Optional[int] = None
    in_proj_x: Optional[int] = None
    in_proj_z: Optional[int] = None
    x_proj: Optional[int] = None
    x_proj_B: Optional[int] = None
    dt_proj: Optional[int] = None
    embed: Optional[int] = None
    scale: float = 0.1
    dropout: float = 0.1


@dataclass(frozen=True)
class GateConfig:
    """Memba's membrane gate (see ``MembraneGate``)."""
    rank: int = 16
    num_chunks: int = 4
    leak: float = 0.5
    threshold: float = 1.0
    transfer: bool = True
    residual: bool = True


@dataclass(frozen=True)
class AdapterConfig:
    """ParallelAdapter beside out_proj: + s * up(dropout(relu(down(x))))."""
    rank: int = 32
    scale: float = 0.1
    dropout: float = 0.1


@dataclass(frozen=True)
class AdditionalScanConfig:
    """``states`` extra SSM state dimensions per direction (Vim)."""
    states: int = 6


@dataclass(frozen=True)
class AffixConfig:
    """``tokens`` learned tokens per layer and direction, prepended in the in_proj output
    space before the conv and dropped before out_proj (Vim). ``projection``: produce
    them with Embedding -> Linear -> Tanh -> Linear (``hidden`` wide, default the
    in_proj width) instead of learning them directly."""
    tokens: int = 3
    projection: bool = True
    hidden: Optional[int] = None


@dataclass(frozen=True)
class PromptConfig:
    """``tokens`` learned input tokens, half before and half after the sequence (Vim);
    ``projection``: through an embed_dims-wide Linear -> Tanh -> Linear."""
    tokens: int = 8
    projection: bool = True


@dataclass(frozen=True)
class PartialConfig:
    """Zero-initialised trainable deltas added to pretrained tensors (Vim)."""
    A_log: bool = False
    D: bool = False
    conv1d: bool = False
    dt_bias: bool = False
    cls_token: bool = False
    pos_embed: bool = False


@dataclass(frozen=True)
class PEFTConfig:
    lora: Optional[LoRAConfig] = None
    gate: Optional[GateConfig] = None
    adapter: Optional[AdapterConfig] = None
    additional_scan: Optional[AdditionalScanConfig] = None
    affix: Optional[AffixConfig] = None
    prompt: Optional[PromptConfig] = None
    partial: Optional[PartialConfig] = None

    def lora_rank(self, target: str) -> Optional[int]:
        """LoRA rank for a ``LoRAConfig`` target ('in_proj', 'x_proj', ...), or None."""
        return (getattr(self.lora, target) or None) if self.lora is not None else None

    def methods(self) -> tuple:
        """The keys that are set, e.g. ('lora', 'gate')."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)


LORA_TARGETS = tuple(f.name for f in fields(LoRAConfig) if f.name not in ('scale', 'dropout'))
METHOD_CONFIGS = {f.name: cls for f, cls in zip(fields(PEFTConfig), (
    LoRAConfig, GateConfig, AdapterConfig, AdditionalScanConfig, AffixConfig, PromptConfig,
    PartialConfig))}
NAMED = {'full': None, 'none': None, 'linear': {}, '{}': {}}


def _build(cls, cfg, where: str):
    if not isinstance(cfg, dict):
        raise TypeError(f'{where} must be a dict, got {type(cfg).__name__}')
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        raise KeyError(f'{where}: unknown key {unknown[0]!r} (valid keys: {", ".join(valid)})')
    return cls(**cfg)


def parse_peft(peft) -> Optional[PEFTConfig]:
    """dict / ConfigDict / method name -> PEFTConfig; None or 'full' -> None (full training).

    Strings: 'full', 'linear' and '{}' (what ``--cfg-options model.backbone.peft={}``
    passes). Unknown keys are errors.
    """
    if peft is None or isinstance(peft, PEFTConfig):
        return peft
    if isinstance(peft, str):
        if peft.strip().lower() not in NAMED:
            raise ValueError(f'peft must be a dict, None or one of {", ".join(NAMED)}; '
                             f'got {peft!r}')
        peft = NAMED[peft.strip().lower()]
        if peft is None:
            return None
    if not isinstance(peft, dict):
        peft = dict(peft) if hasattr(peft, 'keys') else peft
    cfg = _build(PEFTConfig, dict(peft), 'peft')
    return PEFTConfig(**{key: None if value is None else
                         _build(METHOD_CONFIGS[key], dict(value) if hasattr(value, 'keys')
                                else value, f'peft.{key}')
                         for key, value in vars(cfg).items()})
