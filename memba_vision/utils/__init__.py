"""Small shared utilities."""
from .checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, safe_loading
from .cuda_streams import persistent_stream
from .files import write_text_atomically

__all__ = ["CheckpointError", "extract_state_dict", "load_checkpoint_file", "safe_loading",
           "persistent_stream", "write_text_atomically"]
