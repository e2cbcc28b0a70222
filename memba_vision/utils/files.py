"""Files written whole or not at all."""
import os
import os.path as osp

__all__ = ['write_text_atomically']


def write_text_atomically(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through a temporary file in the same folder
    and a rename: a reader, or a process killed meanwhile, sees the old file or the new
    one, never a part. The file gets the usual permissions (the umask's)."""
    folder, name = osp.split(osp.abspath(path))
    tmp = osp.join(folder, f'.{name}.{os.getpid()}.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)
