"""The one wrapper every command line (train, generate, export, info, plot) runs inside.

A user-facing error (L1Error) becomes one `error: ...` line on stderr and exit status 2; Ctrl-C
outside the trainer's own handling (data preparation, loading, sampling) becomes one line and exit
status 130, the shell's code for SIGINT; so does SIGTERM (a scheduler, `timeout`, `docker stop`),
which would otherwise end the process without a word or its clean-ups. Bugs keep their traceback.
"""

from __future__ import annotations

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
        previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
        try:
            return main(*args, **kwargs) or 0
        except L1Error as exc:
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: say it once
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapped


def _interrupt(signum, frame):
    raise KeyboardInterrupt
