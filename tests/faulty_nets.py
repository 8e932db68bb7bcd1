"""Networks of a project's own package (allowed with MODEL_CODE_MODULES=tests.faulty_nets) that
fail the way real code can: the fault-injection tests serve them on real gunicorn."""

import asyncio
import os
import sys
import time

import torch
from torch import nn

# A file whose presence makes SlowFirstRun's first forward pass in each process take this long.
SLOW_FLAG_VARIABLE = "SLOW_FIRST_RUN_FLAG"
SLOW_SECONDS = 120
# A file whose presence makes FailsWhenFlagged's first forward pass in a process fail.
FAIL_FLAG_VARIABLE = "FAIL_FLAG"


def cancelled(num_classes):
    """A builder whose own code was cancelled: asyncio's CancelledError is a BaseException, not an Exception."""
    raise asyncio.CancelledError("the builder's task was cancelled")


cancelled.__network_builder__ = True


class FirstRunWhenFlagged(nn.Module):
    """A linear digit classifier that misbehaves (:meth:`flagged`) in the first forward pass of a
    process, a worker's warm-up, while the file its ``FLAG_VARIABLE`` names exists; the workers
    already serving go on."""

    FLAG_VARIABLE = ""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(28 * 28, num_classes)
        self.ran = False

    def forward(self, x):
        if not self.ran:
            flag = os.environ.get(self.FLAG_VARIABLE)
            if flag and os.path.exists(flag):
                self.flagged()
            self.ran = True
        return torch.log_softmax(self.fc(x.flatten(1)), 1)

    def flagged(self):
        raise NotImplementedError


class SlowFirstRun(FirstRunWhenFlagged):
    """A worker that boots for minutes: its warm-up takes SLOW_SECONDS while SLOW_FIRST_RUN_FLAG's file exists."""

    FLAG_VARIABLE = SLOW_FLAG_VARIABLE

    def flagged(self):
        print(f"pid {os.getpid()}: warming up slowly", file=sys.stderr, flush=True)
        time.sleep(SLOW_SECONDS)


class FailsWhenFlagged(FirstRunWhenFlagged):
    """A worker that cannot warm up (a device out of memory, a file gone) while FAIL_FLAG's file exists."""

    FLAG_VARIABLE = FAIL_FLAG_VARIABLE

    def flagged(self):
        raise RuntimeError("the warm-up fails while the flag file exists")
