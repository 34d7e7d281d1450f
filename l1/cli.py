"""The one wrapper every command line (train, generate, export, info, plot) runs inside.

A user-facing error (L1Error) becomes one `error: ...` line on stderr and exit status 2; Ctrl-C
outside the trainer's own handling (data preparation, loading, sampling) becomes one line and exit
status 130, the shell's code for SIGINT; so does SIGTERM (a scheduler, `timeout`, `docker stop`),
which would otherwise end the process without a word or its clean-ups. Bugs keep their traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
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
        in_main_thread = threading.current_thread() is threading.main_thread()  # where signals are handled
        with _Interrupts() if in_main_thread else contextlib.nullcontext():
            try:
                return main(*args, **kwargs) or 0
            except L1Error as exc:
                if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: say it once
                    print(f"error: {exc}", file=sys.stderr)
                return EXIT_ERROR
            except KeyboardInterrupt:
                print("\ninterrupted", file=sys.stderr)
                return EXIT_INTERRUPTED

    return wrapped


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
