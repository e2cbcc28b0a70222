import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import memba_vision  # noqa: E402,F401  registers modules

# Tiny architectures shared by the tests (fast on a 2-core CPU).
TINY_VIM = dict(embed_dims=32, depth=3, d_state=4)
TINY_VMAMBA = dict(dims=16, depths=[1, 2, 1], d_state=4)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
