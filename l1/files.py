"""A run's files written whole or not at all (checkpoints, run_id.txt, tokenizer.json, config.json,
training_args.json), and the one message for a write that a full disk refused.

The lowest room beside l1.errors and l1.lock: config, tokenizer and checkpoint write through it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from l1.errors import L1Error
from l1.lock import temporary


def cannot_write(path: str | Path, exc: Exception) -> L1Error:
    """The one line for a run-folder write that failed (a full disk, a file-size limit)."""
    return L1Error(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}; the checkpoints are intact: free space, "
                   "then run the same command to resume")


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: the folder entry itself must reach the disk (POSIX only)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_atomic(path: Path, write: Callable) -> None:
    """write(f) into a temporary file beside path, fsync, rename it over path, fsync the folder, so
    a reader (or a crash) sees the old file or the new one. The temporary name is unique per
    process and call (l1.lock.temporary): two writers of one folder never write into each other's
    file, and the next holder of the folder's lock removes what a killed writer left. On an OSError
    the temporary file is removed and the error raised."""
    path = Path(path)
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write data to path whole or not at all (replace_atomic); a failure is cannot_write's one line."""
    try:
        replace_atomic(Path(path), lambda f: f.write(data))
    except OSError as exc:
        raise cannot_write(path, exc) from None
