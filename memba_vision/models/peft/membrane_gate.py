"""MembraneGate: the Memba correction of Mamba's gate branch z, one LIM per direction."""
from typing import Optional, Tuple

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...ops import lim

__all__ = ['MembraneGate']

Membrane = Optional[Tuple[Optional[Tensor], ...]]


class MembraneGate(nn.Module):
    """z' = z + W_out(LIM(W_in z, u_prev)) for each scan direction.

    Direction 0 sees the tokens in order, direction 1 sees them reversed
    (its LIM runs on the flipped sequence), and each direction has its own LIM
    and membrane chain. Results are returned in input token order.

    Args:
        channels: width of z (Mamba's d_inner).
        rank: LIM width R (W_in: channels -> R, W_out: R -> channels, no bias).
        directions: number of scan directions (2 for Vim and Memba's VMamba).
        shared_proj: one W_in/W_out pair for all directions (Vim) or one pair
            per direction (VMamba).
        num_chunks, leak, threshold: the LIM op's settings (see ``ops.lim``).
        transfer: hand each direction's u_mean to the next layer; when False
            every layer starts from a zero membrane.
        residual: z' = z + correction (default; W_out is zero-initialised so the
            pretrained model is unchanged at step 0). False gives the literal
            Eq. 6 form z' = correction, for ablation.

    Forward:
        z (B, L, C) and the previous layer's membrane (a tuple with one
        (B, L // num_chunks, R) tensor or None per direction, or None) ->
        (tuple of z' per direction, each (B, L, C) in input token order; the
        new membrane tuple, or None when ``transfer`` is False).
    """

    def __init__(self, channels: int, rank: int = 16, directions: int = 2,
                 shared_proj: bool = True, num_chunks: int = 4, leak: float = 0.5,
                 threshold: float = 1.0, transfer: bool = True, residual: bool = True):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= channels:
            raise ValueError(f'gate rank must be an integer in [1, {channels}], got {rank!r}')
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f'gate num_chunks must be an integer >= 1, got {num_chunks!r}')
        if directions not in (1, 2):
            raise ValueError(f'gate directions must be 1 or 2, got {directions!r}')
        self.channels, self.rank, self.directions = channels, rank, directions
        self.num_chunks, self.leak, self.threshold = num_chunks, float(leak), float(threshold)
        self.transfer, self.residual, self.shared_proj = bool(transfer), bool(residual), shared_proj
        num_proj = 1 if shared_proj else directions
        self.proj_in = nn.ModuleList(nn.Linear(channels, rank, bias=False)
                                     for _ in range(num_proj))
        self.proj_out = nn.ModuleList(nn.Linear(rank, channels, bias=False)
                                      for _ in range(num_proj))
        for proj in self.proj_out:
            nn.init.zeros_(proj.weight)

    def lim_spikes(self, z: Tensor, membrane: Membrane = None
                   ) -> Tuple[Tuple[Tuple[Tensor, Tensor], ...], Membrane]:
        """The correction of each direction in low-rank form.

        z (B, L, C) -> (one (spikes (B, L, R), W_out (C, R)) pair per direction,
        the spikes in input token order, so that the correction is
        spikes @ W_out^T; the new membrane). A mixer can hand the pair to
        ``ops.selective_scan_tokens(gate=...)``, which adds it to z before the scan.
        """
        if membrane is None or not self.transfer:
            membrane = (None,) * self.directions
        pairs, new_membrane = [], []
        shared_in = self.proj_in[0](z) if self.shared_proj else None
        for d in range(self.directions):
            k = 0 if self.shared_proj else d
            # W_in acts per token: the reversed direction flips W_in z, not z
            v = shared_in if shared_in is not None else self.proj_in[k](z)
            if d == 1:
                v = v.flip(1)
            spikes, u_mean = lim(v, self.num_chunks, self.leak, self.threshold, membrane[d])
            pairs.append((spikes.flip(1) if d == 1 else spikes, self.proj_out[k].weight))
            new_membrane.append(u_mean)
        return tuple(pairs), (tuple(new_membrane) if self.transfer else None)

    def forward(self, z: Tensor, membrane: Membrane = None
                ) -> Tuple[Tuple[Tensor, ...], Membrane]:
        pairs, membrane = self.lim_spikes(z, membrane)
        gated = []
        for spikes, weight in pairs:
            correction = F.linear(spikes, weight)
            gated.append(z + correction if self.residual else correction)
        return tuple(gated), membrane

    def extra_repr(self) -> str:
        return (f'channels={self.channels}, rank={self.rank}, directions={self.directions}, '
                f'shared_proj={self.shared_proj}, num_chunks={self.num_chunks}, '
                f'leak={self.leak:g}, threshold={self.threshold:g}, '
                f'transfer={self.transfer}, residual={self.residual}')
