"""Run a Python program as Windows would, as far as locks go: `import fcntl` fails, and an msvcrt
module offers locking() with Windows' semantics for L1's use of it (an exclusive lock per open
file, refused at once with EACCES while another holds it, dropped when its holder exits or dies),
built on the real flock, which the program itself can no longer reach.

    python tests/without_fcntl.py script.py ARGS...
    python tests/without_fcntl.py -c CODE ARGS...
"""

import errno
import fcntl as _fcntl
import runpy
import sys
import types

LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2  # Windows' values


def locking(fd: int, mode: int, nbytes: int) -> None:
    if mode == LK_UNLCK:
        _fcntl.flock(fd, _fcntl.LOCK_UN)
    elif mode == LK_NBLCK:
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None
    else:
        raise ValueError(f"mode {mode} is not emulated")


msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_LOCK, msvcrt.LK_NBLCK, msvcrt.locking = LK_UNLCK, LK_LOCK, LK_NBLCK, locking
sys.modules["fcntl"] = None  # `import fcntl` now raises ImportError, as on Windows
sys.modules["msvcrt"] = msvcrt
import l1.lock  # noqa: E402  the one module that takes this msvcrt: it finds no fcntl
del sys.modules["msvcrt"]  # elsewhere (subprocess, getpass) an importable msvcrt means Windows: this is not
assert l1.lock.fcntl is None and l1.lock.msvcrt is msvcrt

if sys.argv[1] == "-c":
    code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
