"""Small shared utilities."""
from .checkpoint import extract_state_dict, load_checkpoint_file, register_safe_globals
from .cuda_streams import persistent_stream
from .files import write_text_atomically

__all__ = ["extract_state_dict", "load_checkpoint_file", "register_safe_globals",
           "persistent_stream", "write_text_atomically"]
