"""Additional-scan: extra SSM state dimensions with their own B and C projection."""
import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['AdditionalScan']


class AdditionalScan(nn.Module):
    """``states`` extra state dimensions for one scan direction.

    ``A_log`` (D, states) starts as a copy of the pretrained A_log's first column;
    ``x_proj`` (D -> 2 * states, default init) gives the extra B and C columns.
    ``extend`` appends them to the direction's A and x_proj rows, so the scan runs
    with N + states states (the state dimensions are independent, so where they
    are appended does not matter).
    """

    def __init__(self, A_log: Tensor, states: int):
        super().__init__()
        if isinstance(states, bool) or not isinstance(states, int) or states < 1:
            raise ValueError(f'additional_scan states must be an integer >= 1, got {states!r}')
        d_inner = A_log.shape[0]
        self.states = states
        self.A_log = nn.Parameter(A_log.detach()[:, :1].float().repeat(1, states).clone())
        self.x_proj = nn.Linear(d_inner, 2 * states, bias=False)

    def extend(self, A: Tensor, x_proj_weight: Tensor, dt_rank: int):
        """(A (D, N + k), x_proj weight (R + 2(N + k), D)): rows [dt | B | B' | C | C']."""
        n = A.shape[1]
        extra = self.x_proj.weight.to(x_proj_weight.dtype)
        w = x_proj_weight
        weight = torch.cat([w[:dt_rank + n], extra[:self.states], w[dt_rank + n:],
                            extra[self.states:]], dim=0)
        return torch.cat([A, -torch.exp(self.A_log.float())], dim=1), weight

    def extra_repr(self) -> str:
        return f'states={self.states}'
