"""One writer per folder: an exclusive lock that the OS drops when its holder dies (SIGKILL
included), on POSIX and on Windows alike, and temporary file names that no two writers share.

Where fcntl exists (Linux, macOS) the lock is flock on the folder itself, not on a file inside:
a lock file is clutter that users delete, and a deleted lock file lets a second writer in, while
nobody deletes a run's folder and expects the run to go on. Windows has neither fcntl nor locks
on folders; there the lock is byte 0 of a file beside the folder (msvcrt.locking), which Windows
lets nobody delete while it is open, and beside rather than inside, so that the folder can be
renamed under the lock (data preparation renames its work folder when done). Everything else
(waiting, the holder's PID, whether the folder is still the one locked) is shared by both.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

NOTE = ".lock"  # in a folder locked with note=True: the holder's PID, for the message others get
POLL_S = 0.2  # how often a waiting process tries again
TEMPORARY = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp")  # what temporary() names


def temporary(path: Path) -> Path:
    """A name beside `path` to write it under before renaming it into place, unique to this process
    and call: two writers of the same file never write into one temporary file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def remove_temporaries(folder: Path) -> None:
    """Remove the temporary files that writers killed mid-write left in `folder`. Only the holder
    of the folder's lock may: every other writer's temporary file is then a dead one."""
    for path in Path(folder).iterdir():
        if TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)


class FolderLock:
    """An exclusive lock on a folder, held by one process until release() or its death.

    With note=True the holder writes its PID into the folder's .lock file; holder() reads it, or
    on Linux asks the kernel where the note was deleted.
    """

    def __init__(self, folder: Path, note: bool = False):
        self.folder = Path(folder)
        self.note = note
        self._target = self.folder if fcntl else self.folder.parent / f".{self.folder.name.lstrip('.')}.lock"
        self._fd: int | None = None
        self._locked: os.stat_result | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False while another process holds it. OSError where the
        folder cannot be opened (or, with note=True, the note cannot be written)."""
        fd = _open(self._target)
        if not _try_lock(fd):
            os.close(fd)
            return False
        self._hold(fd)
        return True

    def acquire(self, on_wait: Callable[[], None]) -> FolderLock:
        """Take the lock, waiting as long as another process holds it (on_wait is called once, when
        the wait begins); an interrupt while waiting leaves nothing open."""
        fd = _open(self._target)
        try:
            if not _try_lock(fd):
                on_wait()
                while not _try_lock(fd):
                    time.sleep(POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self._hold(fd)
        return self

    def _hold(self, fd: int) -> None:
        self._fd, self._locked = fd, os.fstat(fd)
        if self.note:
            try:
                (self.folder / NOTE).write_text(f"{os.getpid()}\n")
            except OSError:
                self.release()
                raise

    def intact(self) -> bool:
        """Whether the folder's path still leads to what this process locked: False once the folder
        was deleted, moved or replaced (a writer must then stop: another may hold that path now)."""
        try:
            return self._locked is not None and os.path.samestat(self._locked, os.stat(self._target))
        except OSError:
            return False

    def holder(self) -> str:
        """The PID of the process that holds the lock, as far as can be told ("unknown" otherwise)."""
        try:
            pid = (self.folder / NOTE).read_text().strip()
        except (OSError, UnicodeDecodeError):
            pid = ""
        return pid if pid.isdigit() else _kernel_holder(self._target) or "unknown"

    def release(self) -> None:
        """Let go of the lock. The note stays: it is read only while the lock is held, when it is
        the holder's."""
        if self._fd is None:
            return
        if not fcntl:
            msvcrt.locking(self._fd, msvcrt.LK_UNLCK, 1)  # Windows drops it at close too, but not at once
        os.close(self._fd)
        self._fd = self._locked = None


def _open(target: Path) -> int:
    if fcntl:
        return os.open(target, os.O_RDONLY)  # a folder: flock needs no write access
    return os.open(target, os.O_RDWR | os.O_CREAT, 0o644)


def _try_lock(fd: int) -> bool:
    """An exclusive lock on an open file or folder without waiting; False while another holds it."""
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # byte 0: the descriptor never moves from there
    except (BlockingIOError, PermissionError):  # flock's EWOULDBLOCK; msvcrt's EACCES
        return False
    return True


def _kernel_holder(target: Path) -> str | None:
    """The PID that holds a flock on target, from Linux's lock table; None elsewhere or if none."""
    locks = Path("/proc/locks")
    if not locks.is_file():
        return None
    try:
        st = os.stat(target)
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in locks.read_text().splitlines():
            fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"; waiters have "->"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                return fields[4]
    except OSError:
        return None
    return None
