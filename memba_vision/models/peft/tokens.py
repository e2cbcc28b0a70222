"""Learned tokens (affix- and prompt-tuning): an embedding, optionally through an MLP."""
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['LearnedTokens']


class LearnedTokens(nn.Module):
    """``num_tokens`` learned vectors of width ``out_features``.

    Without ``projection``: an Embedding(num_tokens, out_features). With it: an
    Embedding(num_tokens, token_dim) -> Linear(token_dim, hidden) -> Tanh ->
    Linear(hidden, out_features). forward() -> (num_tokens, out_features); the
    tokens do not depend on the input, so the batch shares them.
    """

    def __init__(self, num_tokens: int, out_features: int, projection: bool = True,
                 token_dim: Optional[int] = None, hidden: Optional[int] = None):
        super().__init__()
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f'the number of learned tokens must be an integer >= 1, '
                             f'got {num_tokens!r}')
        self.num_tokens, self.projection = num_tokens, bool(projection)
        if self.projection:
            token_dim = token_dim or out_features
            hidden = hidden or token_dim
            self.embedding = nn.Embedding(num_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(),
                                           nn.Linear(hidden, out_features))
        else:
            self.embedding = nn.Embedding(num_tokens, out_features)

    def forward(self) -> Tensor:
        tokens = self.embedding.weight
        return self.transform(tokens) if self.projection else tokens

    def extra_repr(self) -> str:
        return f'num_tokens={self.num_tokens}, projection={self.projection}'
