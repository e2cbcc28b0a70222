"""Small shared utilities."""
from .checkpoint import extract_state_dict, load_checkpoint_file, register_safe_globals

__all__ = ["extract_state_dict", "load_checkpoint_file", "register_safe_globals"]
