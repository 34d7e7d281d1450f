"""The one wrapper every command line (train, generate, eval, export, info, plot) runs inside.

A user-facing error (L1Error) becomes one `error: ...` line on stderr and exit status 2; Ctrl-C
outside the trainer's own handling (data preparation, loading, sampling) becomes one line and exit
status 130, the shell's code for SIGINT; so does SIGTERM (a scheduler, `timeout`, `docker stop`),
which would otherwise end the process without a word or its clean-ups. A reader of the output
that leaves early (`| head`) ends the command quietly with exit status 0, as Unix tools do. A path
with a name longer than the file system allows is bad input wherever it is met: one line too. Bugs
keep their traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import signal
import sys
import threading
from typing import Callable

from l1.errors import L1Error

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def entry_point(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a command's main(argv) so that it returns an exit status instead of raising."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            try:
                return _run(main, *args, **kwargs)
            finally:  # output still buffered meets a closed pipe here, not in "Exception ignored" at exit
                if sys.stdout is not None:
                    sys.stdout.flush()
        except BrokenPipeError:
            if not _reader_gone():  # another pipe (a child process's): a bug, keep its traceback
                raise
            _to_devnull()
            return 0

    return wrapped


def _run(main: Callable[..., int | None], *args, **kwargs) -> int:
    """main's exit status: 0, or EXIT_ERROR after one error line, or EXIT_INTERRUPTED."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signals are handled
    with _Interrupts() if in_main_thread else contextlib.nullcontext():
        try:
            return main(*args, **kwargs) or 0
        except L1Error as exc:
            return _refuse(str(exc))
        except OSError as exc:
            # A path given with a name longer than the file system allows fails in whichever call
            # meets it first (exists(), open(), mkdir()): bad input in every tool, never a bug.
            if exc.errno != errno.ENAMETOOLONG:
                raise
            return _refuse(f"{exc.filename}: a name in this path is longer than the file system allows "
                           "(255 bytes on most): choose a shorter one")
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def _refuse(message: str) -> int:
    """One error line (once under torchrun, where every rank fails alike); EXIT_ERROR."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _streams() -> list:
    return [s for s in (sys.stdout, sys.stderr) if s is not None]


def _reader_gone() -> bool:
    """Whether standard output's (or error's) reader has closed its end of the pipe."""
    if not hasattr(select, "poll"):  # Windows: no poll; a broken pipe there is the console's
        return True
    for stream in _streams():
        try:
            poll = select.poll()
            poll.register(stream.fileno(), select.POLLOUT)
        except (AttributeError, ValueError, OSError):  # replaced by an object without a descriptor
            continue
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0)):
            return True
    return False


def _to_devnull() -> None:
    """Point the standard streams at the null device, so that what is still buffered (and Python's
    flush at exit) goes nowhere instead of failing again."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in _streams():
        try:
            os.dup2(null, stream.fileno())
        except (AttributeError, ValueError, OSError):
            pass
    os.close(null)


class _Interrupts:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt in the command's code, and never get lost.

    Python runs a signal's handler wherever the main thread is, and that can be a finalizer or a
    weakref callback that the garbage collector started: an exception there is printed as
    "Exception ignored in ...", with a traceback, and dropped, and the command would go on as if
    nothing had been asked. Such a swallowed interrupt is sent again, quietly, until it lands.
    """

    def __enter__(self):
        self.signum, self.active = signal.SIGINT, True
        self.previous = {sig: signal.signal(sig, self._raise) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.unraisablehook, sys.unraisablehook = sys.unraisablehook, self._swallowed
        return self

    def __exit__(self, *exc):
        self.active = False
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = self.unraisablehook

    def _raise(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt

    def _swallowed(self, unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            return self.unraisablehook(unraisable)
        # From another thread, a moment later: sent from here, it would be handled inside this hook,
        # which swallows it too.
        timer = threading.Timer(0.01, self._resend)
        timer.daemon = True
        timer.start()

    def _resend(self):
        if self.active:  # not once the command has ended: the handlers outside are not ours
            signal.raise_signal(self.signum)  # not os.kill: on Windows that terminates the process
