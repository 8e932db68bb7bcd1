"""gunicorn settings: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

The model is loaded once in the master (``preload_app``) so workers share its memory; what is not
fork-safe (torch thread pools, CUDA, the warm-up pass) happens in each worker after the fork.
Command-line flags and ``GUNICORN_CMD_ARGS`` override anything set here.
"""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dotenv import load_dotenv  # noqa: E402

load_dotenv()  # the same .env as wsgi.py, read before the settings below

from config.logging import capture_warnings, logging_config  # noqa: E402
from config.settings import ConfigError, from_env, server_from_env  # noqa: E402

try:
    _server = server_from_env()
    _app_settings = from_env()
except ConfigError as exc:
    sys.exit(f"error: {exc}")

# prometheus_client picks multiprocess mode at import, from this variable: set it before the app
# is imported, and remove the metric files of an earlier run so their counts are not merged in
# (only those: the directory may be shared with other files).
_metrics_dir = _server.metrics_dir or tempfile.mkdtemp(prefix="prediction-service-metrics-")
os.makedirs(_metrics_dir, exist_ok=True)
for _stale in Path(_metrics_dir).glob("*.db"):
    _stale.unlink(missing_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def _remove_own_metrics_dir(master_pid=os.getpid()):
    # Workers run exit handlers too: only the master, on its way out, removes the directory.
    if os.getpid() == master_pid:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


if not _server.metrics_dir:
    # atexit, not gunicorn's on_exit: a start that fails before gunicorn's main loop skips on_exit.
    atexit.register(_remove_own_metrics_dir)

bind = f"0.0.0.0:{_server.port}"
workers = _server.workers
worker_class = "sync"
timeout = _server.timeout
graceful_timeout = _server.graceful_timeout
keepalive = 5
preload_app = True
control_socket_disable = True  # no admin socket: nothing uses it, and test servers would share one
# A safety net against slow leaks: each worker is replaced after this many requests (jittered so
# workers do not restart together).
max_requests = _server.max_requests
max_requests_jitter = _server.max_requests_jitter
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms request_id=%({x-request-id}o)s'
logconfig_dict = logging_config(_app_settings.LOG_LEVEL, _app_settings.LOG_FORMAT)
loglevel = _app_settings.LOG_LEVEL.lower()
capture_warnings()


def _one_line(message):
    """``message`` as one printable line: what a failed start prints must be one clear line."""
    text = " ".join(str(message).split())
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def on_starting(server):
    """In the master, once the app is imported: load (or fetch) the model, or stop with one line."""
    import torch

    from service.registry import ModelLoadError, registry

    # A parallel region run here (building the network initialises its weights) would leave
    # OpenMP's thread team in the master, and a worker forked from it hangs in its first
    # multi-threaded forward pass. One thread here; each worker sets its own after the fork.
    torch.set_num_threads(1)
    try:
        registry.load()
    except ModelLoadError as exc:
        sys.exit(f"error: {_one_line(exc)}")


def pre_fork(server, worker):
    """In the master, just before it forks a worker: keep the garbage collector off shared objects."""
    import gc

    # Everything loaded so far (the app, torch, the model) lives as long as the process. Frozen,
    # a worker's collections never scan it: no 100+ ms pause on its first full collection, and
    # no writes to those objects that would copy the master's pages into each worker.
    gc.freeze()


def post_fork(server, worker):
    """In each worker: torch threads, device, warm-up pass, model-info metric."""
    from service.observability import record_model
    from service.registry import ModelLoadError, registry

    try:
        registry.prepare_worker(threads=server_from_env(workers=server.cfg.workers).torch_threads)
    except ModelLoadError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr, flush=True)
        # gunicorn's "worker failed to boot" code: the master stops rather than fork it again.
        sys.exit(server.WORKER_BOOT_ERROR)
    record_model(registry.info.get("model_uuid"), registry.info["sha256"], registry.info["device"])


def pre_request(worker, req):
    """Give the request its id before anything is logged about it; the app keeps and returns it."""
    from service.observability import REQUEST_ID_HEADER, bind_request_id

    incoming = next((value for name, value in req.headers if name == REQUEST_ID_HEADER.upper()), None)
    bind_request_id(incoming)
    worker.log.debug("%s %s", req.method, req.path)


def post_request(worker, req, environ, resp):
    """Forget the id once the request is answered and its access line written."""
    from service.observability import unbind_request_id

    unbind_request_id()


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the merged metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _metrics_dir)
