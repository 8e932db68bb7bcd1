"""Networks of a project's own package (allowed with MODEL_CODE_MODULES=tests.faulty_nets) that
fail the way real code can: the fault-injection tests serve them on real gunicorn."""

import asyncio


def cancelled(num_classes):
    """A builder whose own code was cancelled: asyncio's CancelledError is a BaseException, not an Exception."""
    raise asyncio.CancelledError("the builder's task was cancelled")


cancelled.__network_builder__ = True

