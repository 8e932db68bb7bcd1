"""What the gunicorn master and its workers do at each step (``config/gunicorn.conf.py`` calls these).

The model is loaded once in the master before it forks, so workers share its weights; what is not
fork-safe (torch thread pools, CUDA, the warm-up pass) happens in each worker after the fork. A
rollout happens in the master too: the alias watcher, a thread of the master, fetches and checks a
new version off gunicorn's main loop and sends SIGHUP only once it passed; on SIGHUP (the watcher's,
or an operator's ``kill -HUP``, which looks at the source there and then unless the watcher is
fetching a version already) the master swaps it in, then gunicorn forks new workers from it and
retires the old ones gracefully, each finishing the request it has. Nothing a model, a download, the tracking server or a check does reaches gunicorn's
main loop as an exception.
"""

import gc
import logging
import multiprocessing
import os
import signal
import sys
import time

import torch

from config.settings import Settings, server_from_env
from service import observability
from service.registry import EXTENSION, AliasWatcher, ModelLoadError, Outcome

log = logging.getLogger(__name__)

# The exit code of a worker that failed to start after the server's first boot: gunicorn starts
# another one (unlike WORKER_BOOT_ERROR, which stops the server).
WORKER_RETRY_EXIT = 1
# A worker that fails to start waits before it exits, longer each time in a row, up to this.
WORKER_RETRY_MAX_SECONDS = 30
# After a rollout, this many workers in a row failing to start it (none started) roll it back.
ROLLBACK_AFTER_FAILURES = 3


class WorkerBoots:
    """How workers started since the master did, shared by the master and its workers (made in
    the master before the first fork): whether any worker ever became ready — until then a
    failure stops start-up; after, a failing worker is started again — the failures in a row,
    and whether a worker started the version the last rollout swapped in."""

    def __init__(self):
        # [workers ready so far, failures in a row, workers ready when the last rollout swapped]
        self._counts = multiprocessing.RawArray("q", 3)

    @property
    def first(self):
        """True until a worker has started and become ready."""
        return self._counts[0] == 0

    @property
    def ready(self):
        """How many workers started and became ready."""
        return self._counts[0]

    def started(self):
        """A worker became ready."""
        self._counts[0] += 1
        self._counts[1] = 0

    def failed(self):
        """A worker failed to start: the seconds it waits before it exits (doubling in a row)."""
        self._counts[1] += 1
        return min(WORKER_RETRY_MAX_SECONDS, 0.5 * 2 ** min(self._counts[1] - 1, 16))

    @property
    def failures(self):
        """Workers that failed to start in a row."""
        return self._counts[1]

    def swapped(self):
        """The master swapped in a new version: from now on, its workers' starts count."""
        self._counts[2] = self._counts[0]
        self._counts[1] = 0

    @property
    def swapped_version_started(self):
        """True once a worker started after the last swap (or when there was none)."""
        return self._counts[0] > self._counts[2]


class EscapedOnUse(dict):
    """gunicorn's access-line atoms, each escaped as its ``SafeAtoms`` escapes them (``"`` in a
    value as ``\\"``; a ``{header}i``-style key in any case; ``-`` for one that is missing), but
    only when the line's format asks for it: the atoms hold every request and response header
    and the whole WSGI environ, and a line uses half a dozen of them."""

    def __getitem__(self, key):
        if key.startswith("{"):
            key = key.lower()
        value = self.get(key, "-")
        return value.replace('"', '\\"') if isinstance(value, str) else value


def quicker_access_lines(log):
    """Have gunicorn's logger ``log`` write the same access lines for less (:class:`EscapedOnUse`).

    Set on the logger object rather than as gunicorn's ``logger_class``: whichever class gunicorn
    chooses (its statsd logger, when ``--statsd-host`` is given) keeps working.
    """
    log.atoms_wrapper_class = EscapedOnUse


def one_line(message):
    """``message`` as one printable line: what a failed start prints must be one clear line."""
    text = " ".join(str(message).split())
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def registry_of(server):
    """The model registry of the app gunicorn serves."""
    return server.app.wsgi().extensions[EXTENSION]


def on_starting(server):
    """In the master, once the app is imported: load (or fetch) the model, or stop with one line."""
    # A parallel region run here (building the network initialises its weights) would leave
    # OpenMP's thread team in the master, and a worker forked from it hangs in its first
    # multi-threaded forward pass. One thread here; each worker sets its own after the fork.
    torch.set_num_threads(1)
    registry = registry_of(server)
    try:
        registry.load()
    except ModelLoadError as exc:
        sys.exit(f"error: {one_line(exc)}")
    registry.on_rollout = count_rollout
    registry.share_rollouts()
    server.worker_boots = WorkerBoots()


def count_rollout(rollout):
    """The rollouts metric, by outcome (a staged candidate is not a rollout yet: it is counted when
    it is swapped in)."""
    observability.record_rollout(rollout.outcome.value)


def when_ready(server):
    """In the master, listening: watch the model's alias (if it follows one and polling is on), and
    run again a parity check that could not run."""
    registry = registry_of(server)
    source = registry.source
    follow = bool(source is not None and source.follows and registry.poll_seconds)
    if not follow and not registry.verify_on_start:
        return None
    master = os.getpid()
    interval = registry.poll_seconds or Settings.PRED_MODEL_POLL_SECONDS
    watcher = AliasWatcher(registry, interval, lambda: os.kill(master, signal.SIGHUP), follow=follow)
    watcher.start()
    if follow:
        server.log.info("watching %s every %d s for a new version", source.uri, interval)
    return watcher


def on_reload(server):
    """In the master, on SIGHUP, before the new workers are forked: roll out a new version, if any
    (or back to the one before, when the workers could not start a new one)."""
    boots = getattr(server, "worker_boots", None)
    try:
        rollout = registry_of(server).refresh()
        if boots is not None and rollout.outcome is Outcome.SWAPPED:
            boots.swapped()
    except Exception:  # refresh turns every error into an outcome; this is the last guard of gunicorn's loop
        log.exception("rollout: unexpected error; the served model stays")
    # The old model's objects were frozen before the last fork: unfreeze them so that whatever
    # a reference cycle still holds is collected now, not never.
    gc.unfreeze()
    gc.collect()


def pre_fork(server, worker):
    """In the master, just before it forks a worker: keep the garbage collector off shared objects."""
    # Everything loaded so far (the app, torch, the model) lives as long as the process. Frozen,
    # a worker's collections never scan it: no 100+ ms pause on its first full collection, and
    # no writes to those objects that would copy the master's pages into each worker.
    gc.freeze()


# The signals gunicorn's master stops its workers with (gracefully, at once, and on Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)


def stop_while_booting():
    """In a worker just forked: let the stop signals end it while it boots.

    Until gunicorn installs a worker's own handlers, after post_fork, the worker has the master's,
    which only queue a signal for a main loop it never runs: a worker stopped in its warm-up
    would finish it first, and keep a stopping master waiting up to GUNICORN_GRACEFUL_TIMEOUT.
    A booting worker holds no request, so it may simply end.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def post_fork(server, worker):
    """In each worker: access lines, torch threads, device, warm-up pass, model-info metric.

    A worker that cannot warm the model up stops the server while none has ever started (one
    line says why); after that, it waits (longer each time in a row) and exits with a code on
    which gunicorn starts another, so that a respawn hours later never takes the server down.
    """
    stop_while_booting()
    quicker_access_lines(worker.log)
    registry = registry_of(server)
    registry.after_fork()
    boots = getattr(server, "worker_boots", None) or WorkerBoots()
    try:
        registry.prepare_worker(threads=server_from_env(workers=server.cfg.workers).torch_threads)
    except Exception as exc:
        if not isinstance(exc, ModelLoadError):
            log.exception("worker start-up failed")
        if boots.first:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            # gunicorn's "worker failed to boot" code: the master stops rather than fork it again.
            sys.exit(server.WORKER_BOOT_ERROR)
        delay = boots.failed()
        print(f"error: {one_line(exc)} (this worker exits in {delay:g} s; another is started)", file=sys.stderr, flush=True)
        time.sleep(delay)
        sys.exit(WORKER_RETRY_EXIT)
    boots.started()
    info = registry.current.info
    observability.record_model(info.get("model_uuid"), info["sha256"], info["device"], info.get("engine", "torch"))


def pre_request(worker, req):
    """Give the request its id before anything is logged about it; the app keeps and returns it."""
    incoming = next((value for name, value in req.headers if name == observability.REQUEST_ID_HEADER.upper()), None)
    observability.bind_request_id(incoming)
    worker.log.debug("%s %s", req.method, req.path)


def post_request(worker, req, environ, resp):
    """Forget the id once the request is answered and its access line written."""
    observability.unbind_request_id()


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the merged metrics, and fold its counts into the
    totals; then roll back a version whose workers cannot start (:func:`roll_back_if_failing`)."""
    try:
        observability.mark_process_dead(worker.pid, server.app.wsgi().config["PROMETHEUS_MULTIPROC_DIR"])
    except Exception:  # the metrics must never take the master down
        log.exception("merging the metrics of worker %s failed", worker.pid)
    roll_back_if_failing(server)


def roll_back_if_failing(server):
    """In the master, when a worker has exited: once a worker started the version the last rollout
    swapped in, let the one it replaced go; while none did and ROLLBACK_AFTER_FAILURES in a row
    failed, refuse it and reload onto the version before (the registry keeps it until then).
    A version that never started — or the first boot — has nothing to go back to: its workers
    go on trying, with backoff."""
    boots = getattr(server, "worker_boots", None)
    if boots is None:
        return
    try:
        registry = registry_of(server)
        if boots.swapped_version_started:
            registry.started()
        elif boots.failures >= ROLLBACK_AFTER_FAILURES:
            if registry.roll_back(f"{boots.failures} workers in a row failed their warm-up") is not None:
                os.kill(os.getpid(), signal.SIGHUP)
    except Exception:  # must never take the master down
        log.exception("rolling back a version whose workers cannot start failed")
