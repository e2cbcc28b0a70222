"""Membrane, spike, saliency and implicit-attention maps of Vim / VanillaVMamba models."""
from .attention import ScanTerms, implicit_attention, vim_implicit_attention, vim_scan_terms
from .maps import default_layers, explain, mixers_of
from .membrane import LIMTrace, lim_order_to_sequence, lim_trace
from .saliency import grad_cam, input_x_gradient, pool_to_grid, tokens_to_grid, upsample

__all__ = [
    'LIMTrace', 'lim_trace', 'lim_order_to_sequence', 'ScanTerms', 'implicit_attention',
    'vim_scan_terms', 'vim_implicit_attention', 'grad_cam', 'input_x_gradient', 'pool_to_grid',
    'tokens_to_grid', 'upsample', 'explain', 'mixers_of', 'default_layers',
]
