"""Small files of a run written whole or not at all (tokenizer.json, config.json, training_args.json),
and the one message for a write that a full disk refused.

The lowest room beside l1.errors: config and tokenizer write through it.
"""

from __future__ import annotations

import os
from pathlib import Path

from l1.errors import L1Error
from l1.lock import temporary


def cannot_write(path: str | Path, exc: Exception) -> L1Error:
    """The one line for a run-folder write that failed (a full disk, a file-size limit)."""
    return L1Error(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}; the checkpoints are intact: free space, "
                   "then run the same command to resume")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write data to path through a temporary file in the same folder and one rename, so a reader sees
    the old file or the new one. On failure the temporary file is removed and cannot_write is raised.

    The temporary name is unique per process and call (l1.lock.temporary): two writers of one folder
    never write into each other's file, and the next holder of the folder's lock removes what a
    killed writer left.
    """
    path = Path(path)
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, exc) from None
