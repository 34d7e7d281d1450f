"""Run train_gpu_compatible.py with one injected fault, for the fault tests.

L1_FAULT=<kind>:<n> makes the n-th occurrence of an event fail:
  step          SIGKILL inside the n-th forward pass (mid training step)
  eval          SIGKILL in the middle of the n-th evaluation
  mid_write     SIGKILL after half of the n-th checkpoint is written to its temporary file
  overlap       the same, in the background writer, once training has run on past that save (a
                forward pass after it): the kill lands mid-write while the next steps train
  before_rename SIGKILL between the n-th complete temporary write and its rename
  copy          SIGKILL in the middle of the n-th rolling/best copy
  enospc        the n-th checkpoint write fails with "No space left on device"
"""

import errno
import io
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train_gpu_compatible  # noqa: E402
from l1 import checkpoint, trainer  # noqa: E402
from l1.model import GPT  # noqa: E402

KIND, N = os.environ["L1_FAULT"].split(":")
N = int(N)
seen = 0


def nth() -> bool:
    global seen
    seen += 1
    return seen == N


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, make):
    setattr(owner, name, make(getattr(owner, name)))


if KIND == "step":
    wrap(GPT, "forward", lambda f: lambda self, *a, **k: (die() if self.training and nth() else f(self, *a, **k)))
elif KIND == "eval":
    def make_eval_batches(f):
        def batches(*a, **k):
            hit = nth()
            for i, batch in enumerate(f(*a, **k)):
                if hit and i == 1:
                    die()
                yield batch
        return batches
    wrap(trainer, "eval_batches", make_eval_batches)
elif KIND in ("mid_write", "overlap", "enospc"):
    ran_on = threading.Event()  # set by every training forward pass
    if KIND == "overlap":
        wrap(GPT, "forward", lambda f: lambda self, *a, **k: (self.training and ran_on.set(), f(self, *a, **k))[1])

    def make_save(f):
        def save(obj, file, *a, **k):
            if nth():
                if KIND == "enospc":
                    raise OSError(errno.ENOSPC, "No space left on device")
                if KIND == "overlap":
                    ran_on.clear()
                    ran_on.wait(timeout=60)
                buffer = io.BytesIO()
                f(obj, buffer, *a, **k)
                file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                file.flush()
                die()
            return f(obj, file, *a, **k)
        return save
    wrap(torch, "save", make_save)
elif KIND == "before_rename":
    def make_replace(f):
        def replace(src, dst):
            if str(dst).endswith(checkpoint.LATEST) and nth():
                die()
            return f(src, dst)
        return replace
    wrap(os, "replace", make_replace)
elif KIND == "copy":
    def make_copy(f):
        def copy(src, dst, *a, **k):
            if nth():
                with open(dst, "wb") as out:
                    out.write(Path(src).read_bytes()[:1000])
                die()
            return f(src, dst, *a, **k)
        return copy
    wrap(shutil, "copyfile", make_copy)
else:
    raise SystemExit(f"unknown fault kind {KIND}")

sys.exit(train_gpu_compatible.main(sys.argv[1:]))
