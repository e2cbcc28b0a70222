"""memba_vision.ops.dispatch: backend choice, the MEMBA_BACKEND override, per-run logs."""
import mmengine.logging
import pytest
import torch

from memba_vision.ops import dispatch


@pytest.fixture
def logged(monkeypatch):
    """The messages dispatch logs, from a fresh run."""
    messages = []
    monkeypatch.setattr(mmengine.logging, 'print_log',
                        lambda msg, logger=None: messages.append(msg))
    monkeypatch.delenv(dispatch.ENV, raising=False)
    dispatch.reset_backend_log()
    return messages


def test_choose_takes_the_first_backend_that_applies(logged):
    asked = []

    def why(name, reason):
        return lambda: asked.append(name) or reason

    cands = (('a', why('a', 'no a here')), ('b', why('b', '')), ('c', why('c', '')),
             ('reference', None))
    assert dispatch.choose('op', cands) == 'b'
    assert asked == ['a', 'b']  # nothing after the chosen one is asked
    assert logged == ['memba_vision.ops: op runs on b (a: no a here)']
    assert dispatch.choose('op', (('reference', None),)) == 'reference'
    assert logged[-1] == 'memba_vision.ops: op runs on reference'


def test_each_backend_is_logged_once_per_run(logged):
    cands = (('fast', lambda: ''), ('reference', None))
    for _ in range(3):
        dispatch.choose('op', cands)
    assert len(logged) == 1
    dispatch.reset_backend_log()  # a new run
    dispatch.choose('op', cands)
    assert len(logged) == 2 and logged[0] == logged[1]


def test_memba_backend_forces_the_reference(logged, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, 'reference')
    assert dispatch.choose('op', (('fast', lambda: ''), ('reference', None))) == 'reference'
    assert logged == ['memba_vision.ops: op runs on reference (MEMBA_BACKEND=reference)']
    monkeypatch.setenv(dispatch.ENV, 'triton')
    with pytest.raises(ValueError, match="MEMBA_BACKEND must be unset or reference, got 'triton'"):
        dispatch.choose('op', (('reference', None),))


def test_memba_backend_turns_the_fused_vim_core_off(monkeypatch):
    from memba_vision.models.backbones.vim import VimMixer
    from memba_vision.models.peft import parse_peft
    from scan_ext_reference import ReferenceScanKernels
    monkeypatch.delenv(dispatch.ENV, raising=False)
    mixer = VimMixer(20, d_state=16, num_layers=2, peft=parse_peft(dict(
        lora=dict(in_proj=4, out_proj=4), gate=dict(rank=16)))).double()
    for name, p in mixer.named_parameters():  # frozen backbone, as in PEFT
        p.requires_grad_('lora' in name or 'gate' in name)
    xz = mixer.in_proj(torch.randn(1, 8, 20, dtype=torch.float64))
    assert mixer._fused(xz, None, ReferenceScanKernels) is not None
    monkeypatch.setenv(dispatch.ENV, 'reference')
    assert mixer._fused(xz, None, ReferenceScanKernels) is None
