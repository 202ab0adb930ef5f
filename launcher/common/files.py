"""Files every room writes: the one write-to-temp-and-rename (`write_atomic`), the umask this
process writes with (the user's, or 077 for a private run), and the cache root of this user.

The cache root is $FTLAUNCH_CACHE, else $XDG_CACHE_HOME/ftlaunch, else ~/.cache/ftlaunch; the
tokenized data (data/, unless data.cache_dir says), the runtime probe and the checkpoint-name
conversion rules are kept under it.
"""
from __future__ import annotations

import os
import tempfile

CACHE_ENV = "FTLAUNCH_CACHE"


def cache_root() -> str:
    """Where ftlaunch keeps what it can rebuild: $FTLAUNCH_CACHE, else the XDG cache folder."""
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ftlaunch")


def write_atomic(path: str, text: str) -> None:
    """Write text to path through a temporary file in the same folder and a rename: readers
    see the old file or the new one, never half of it; on failure nothing is left behind."""
    if not isinstance(text, str):
        raise TypeError(f"write() argument must be str, not {type(text).__name__}")
    _replace(path, text.encode("utf-8"))


def write_atomic_bytes(path: str, data: bytes) -> None:
    """write_atomic for bytes (an .npz table, for example)."""
    _replace(path, bytes(data))


def _replace(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_USER_UMASK = _umask()  # read once, at import: mkstemp makes 0600 files, the run's files follow umask
_UMASK = _USER_UMASK   # the mask this process writes with: the user's, or keep_private's


def umask_state() -> tuple[int, int]:
    """(the user's umask, read at import; the mask this process writes with now)."""
    return _USER_UMASK, _UMASK


def set_umask_state(user: int, current: int) -> None:
    """Set what umask_state returns, and the process's umask to `current` (a test's own umask
    back after a private run in the test process)."""
    global _USER_UMASK, _UMASK
    _USER_UMASK, _UMASK = user, current
    os.umask(current)


def make_private() -> None:
    """From now on everything this process (and what it starts) creates is the user's alone:
    umask 077, so folders 0700 and files 0600."""
    global _UMASK
    _UMASK = _USER_UMASK | 0o077
    os.umask(_UMASK)
