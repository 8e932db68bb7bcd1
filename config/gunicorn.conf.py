"""gunicorn settings: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

The model is loaded once in the master (``preload_app``) so workers share its memory; what is not
fork-safe (torch thread pools, CUDA, the warm-up pass) happens in each worker after the fork.
Command-line flags and ``GUNICORN_CMD_ARGS`` override anything set here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dotenv import load_dotenv  # noqa: E402

load_dotenv()  # the same .env as wsgi.py, read before the settings below

from config import metrics_dir  # noqa: E402
from config.logging import capture_warnings, logging_config  # noqa: E402
from config.settings import ConfigError, from_env, server_from_env  # noqa: E402

try:
    _server = server_from_env()
    _app_settings = from_env()
except ConfigError as exc:
    sys.exit(f"error: {exc}")

# Before the app (and prometheus_client) is imported; kept as it is when a SIGHUP reloads this file.
metrics_dir.prepare(_server.metrics_dir)

from service import hooks  # noqa: E402  (imports the service, which reads the variable set above)

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


# Each hook is one call into service/hooks.py, which is tested on its own.


def on_starting(server):
    hooks.on_starting(server)


def when_ready(server):
    hooks.when_ready(server)


def on_reload(server):
    hooks.on_reload(server)


def pre_fork(server, worker):
    hooks.pre_fork(server, worker)


def post_fork(server, worker):
    hooks.post_fork(server, worker)


def pre_request(worker, req):
    hooks.pre_request(worker, req)


def post_request(worker, req, environ, resp):
    hooks.post_request(worker, req, environ, resp)


def child_exit(server, worker):
    hooks.child_exit(server, worker)
