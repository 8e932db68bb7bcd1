"""The embedded default: a local MLflow tracking server, the demo model trained there once, then served.

``make serve`` with no model configured runs :func:`serve_demo`: it starts the tracking server
(sqlite store and artifacts under ``var/mlflow/``), trains the demo model there unless a demo run
exists, downloads it by run id as an operator would, and serves it with gunicorn. ``make mlflow``
runs the same tracking server alone (:func:`run_tracking_server`).
"""

import ctypes
import errno
import logging
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from config.settings import PROJECT_ROOT, child_environment

log = logging.getLogger(__name__)

STORE = PROJECT_ROOT / "var" / "mlflow"
HOST = "127.0.0.1"
PORT = 5000
DEMO_TAG = "demo"
DEMO_MODEL_NAME = "digit-classifier"
DEMO_ALIAS = "champion"
DEMO_URI = f"models:/{DEMO_MODEL_NAME}@{DEMO_ALIAS}"
GUNICORN = [str(Path(sys.executable).parent / "gunicorn"), "-c", "config/gunicorn.conf.py", "wsgi:app"]
# The job runner serves MLflow's GenAI features, unused here, with a dozen worker processes.
TRACKING_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
_START_TIMEOUT_S = 180


class DemoError(RuntimeError):
    """The demo cannot be set up; the message says why in one line."""


def tracking_server_command(store=STORE, host=HOST, port=PORT):
    """The ``mlflow server`` command line for a local store: sqlite runs, proxied local artifacts, one worker."""
    store = Path(store).absolute()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"),
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]


def tracking_server_url(host=HOST, port=PORT):
    """The URL clients use for the local tracking server."""
    return f"http://{host}:{port}"


def tracking_server_answers(url):
    """True when an MLflow tracking server answers its health check at ``url``."""
    try:
        response = requests.get(f"{url}/health", timeout=2)
    except requests.RequestException:
        return False
    return response.status_code == 200 and response.text.strip() == "OK"


def port_in_use(host, port):
    """True when something already listens on ``host:port``, so that a server could not bind it now."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        # As gunicorn and uvicorn bind: a port left in TIME_WAIT by a stopped server is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def check_serving_ports(binds):
    """Raise DemoError, saying how to choose another port, when gunicorn could not bind one of ``binds``.

    ``binds`` are ``(host, port, setting)`` as :func:`config.settings.gunicorn_binds` returns them.
    Checked first, before a tracking server starts or a model loads, since gunicorn would only
    retry the port for seconds after all that.
    """
    for host, port, setting in binds:
        if port_in_use(host, port):
            advice = f"PORT={port + 1} make serve" if setting == "PORT" else f"change --bind in {setting}"
            raise DemoError(f"port {port} is already in use: stop what is using it, or serve on another port: {advice}")


def _check_tracking_port(host, port, advice):
    """Raise DemoError when ``host:port`` is taken by something that is not an MLflow tracking server."""
    if port_in_use(host, port):
        raise DemoError(
            f"port {port} on {host} is in use by another program, not an MLflow tracking server: stop it, "
            f"or run the tracking server on another port: {advice}"
        )


def run_tracking_server(store=STORE, host=HOST, port=PORT):
    """Run the tracking server in the foreground (``make mlflow``) until it stops; return its exit status.

    The server runs in its own session, so Ctrl-C reaches this process alone, which then stops the
    server with SIGTERM: uvicorn shuts down on it without the asyncio traceback that SIGINT
    prints while a browser keeps a connection open. Raises DemoError when the port is taken.
    """
    url = tracking_server_url(host, port)
    if tracking_server_answers(url):
        raise DemoError(f"an MLflow tracking server is already running at {url}")
    _check_tracking_port(host, port, f"MLFLOW_PORT={port + 1} make mlflow (or --port {port + 1})")
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    with Supervisor() as children:
        try:
            process = children.start(
                tracking_server_command(store, host, port),
                cwd=store,  # anything the server writes beside its store stays in it
                env=child_environment(TRACKING_SERVER_ENV),
                stdin=subprocess.DEVNULL,
            )
            return process.wait()
        except KeyboardInterrupt:
            log.info("stopping the MLflow tracking server at %s", url)
            return 130


def start_tracking_server(store=STORE, host=HOST, port=PORT, timeout=_START_TIMEOUT_S, children=None):
    """Start the tracking server in its own session, logging to ``<store>/server.log``; wait until it answers.

    With ``children`` (a :class:`Supervisor`), the server is one of its children from the moment it exists.
    """
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    url = tracking_server_url(host, port)
    log_path = store / "server.log"
    log.info("starting the MLflow tracking server at %s (store %s, log %s)", url, store, log_path)
    with open(log_path, "ab") as log_file:
        process = start_child(
            tracking_server_command(store, host, port),
            children.processes if children is not None else [],
            cwd=store,
            env=child_environment(TRACKING_SERVER_ENV),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    started = time.monotonic()
    next_note = started + 5
    try:
        while not tracking_server_answers(url):
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise DemoError(
                    f"the MLflow tracking server exited with {process.returncode}: {tail[0]} (see {log_path})"
                )
            if time.monotonic() - started > timeout:
                raise DemoError(
                    f"the MLflow tracking server did not answer at {url} within {timeout} s (see {log_path})"
                )
            if time.monotonic() > next_note:
                log.info("waiting for the MLflow tracking server at %s (%.0f s)", url, time.monotonic() - started)
                next_note += 5
            time.sleep(0.25)
    except BaseException:
        # Ctrl-C and SIGTERM included: the caller may never get the process, and it runs in its own session.
        stop(process)
        raise
    log.info("MLflow tracking server ready in %.1f s: UI at %s", time.monotonic() - started, url)
    return process


# -- children that never outlive this process ------------------------------------------------------

# What stops the demo and ``make mlflow``: Ctrl-C, kill (make forwards it too), a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


def _lifeline(parent):
    """In the child, between fork and exec: default handlers and an open signal mask for the program
    to come, and SIGTERM when ``parent`` dies (even by SIGKILL), so the child cannot outlive it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the lifeline was tied
        os.kill(os.getpid(), signal.SIGKILL)


def start_child(command, into, **options):
    """Start ``command`` in its own session, tied to this process's life, and append it to ``into``.

    The stop signals wait (blocked) until the process is in ``into``: one that arrives while the
    child is forked and exec'd is handled once whoever stops the processes of ``into`` can see it.
    """
    parent = os.getpid()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process = subprocess.Popen(
            command, start_new_session=True, preexec_fn=lambda: _lifeline(parent), **options
        )
        into.append(process)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return process


def _group_alive(group):
    """True while a process of process group ``group`` runs (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == group and fields[0] != b"Z":
            return True
    return False


def _wait_for_group(process, timeout):
    """Wait until ``process`` has exited and nothing else of its process group runs; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None and not _group_alive(process.pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def stop(process, timeout=20):
    """Stop a process started in its own session and everything in its process group: politely, then
    for good. The group is stopped even when the process itself has exited already (a gunicorn master
    that died on its own leaves its workers)."""
    if process is None:
        return
    if not _signal_group(process, signal.SIGTERM):  # nothing of its group is left
        process.poll()
        return
    if not _wait_for_group(process, timeout):
        _signal_group(process, signal.SIGKILL)
        _wait_for_group(process, 10)
    process.wait()


def _signal_group(process, signum):
    """Send ``signum`` to the process group ``process`` leads; False when nothing of it is left.

    Where the group may not be signalled (a member run by another user; on macOS, a group left
    with zombies only), ``process`` itself still is.
    """
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        process.send_signal(signum)  # a no-op once it has exited and been reaped
    return True


class Supervisor:
    """Stops everything it started, once, whatever signals come.

    As a context manager: the first of SIGINT, SIGTERM or SIGHUP ends the ``with`` body (as
    KeyboardInterrupt, or SystemExit(128 + signal)); on the way out every child started through
    :meth:`start` is stopped, newest first. Signals that come later (make's forwarded copy of a
    SIGTERM, a second Ctrl-C) are noted and cut nothing short.
    """

    def __init__(self, stop_timeout=40):
        self.processes = []
        self.stopping = False
        self.stop_timeout = stop_timeout
        self._previous = {}

    def start(self, command, **options):
        """Start ``command`` as a child this supervisor stops (see :func:`start_child`)."""
        return start_child(command, self.processes, **options)

    def _on_signal(self, signum, frame):
        if self.stopping:
            log.info("%s: already stopping", signal.Signals(signum).name)
            return
        self.stopping = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        self.stopping = True  # from here on, a signal changes nothing
        try:
            for process in reversed(self.processes):
                stop(process, timeout=self.stop_timeout)
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        return False


def find_demo_run(tracking, experiment):
    """The id of the latest finished demo run in ``experiment``, or None."""
    found = tracking.client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = tracking.client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.{DEMO_TAG} = 'true' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def ensure_demo_run(tracking):
    """Return the demo run's id, training and registering it first if the server has none.

    The alias ``champion`` is pointed at the demo run unless it already points somewhere (a model
    trained since and promoted is left as it is).
    """
    from service.training import DEFAULT_EXPERIMENT, TrainConfig, register, train_and_log

    run_id = find_demo_run(tracking, DEFAULT_EXPERIMENT)
    if run_id:
        log.info("reusing demo run %s from %s", run_id, tracking.shown)
        try:
            tracking.client.get_model_version_by_alias(DEMO_MODEL_NAME, DEMO_ALIAS)
        except Exception:  # no such model or alias yet (a store from before the alias was used)
            register(tracking.client, run_id, DEMO_MODEL_NAME, DEMO_ALIAS)
        return run_id
    log.info("no demo run on %s yet: training one (once)", tracking.shown)
    logged = train_and_log(
        TrainConfig(), tracking, DEFAULT_EXPERIMENT, DEMO_MODEL_NAME, DEMO_ALIAS, tags={DEMO_TAG: "true"}
    )
    return logged.run_id


def check_tracking_uri(configured, host=HOST, port=PORT):
    """Raise DemoError when MLFLOW_TRACKING_URI (``configured``, None when unset) names another server than
    the demo's: the demo would not use it, so say how to serve from it instead."""
    from service.mlflow_store import shown_uri

    def same(uri):
        return uri.rstrip("/").replace("//localhost:", f"//{HOST}:")

    if configured is None or same(configured) == same(tracking_server_url(host, port)):
        return
    raise DemoError(
        f"MLFLOW_TRACKING_URI is {shown_uri(configured)} and no model is configured: serve one from that server "
        "with PRED_MODEL_URI=models:/<name>@<alias> make serve, or unset MLFLOW_TRACKING_URI for the local demo"
    )


def serve_demo(models_dir, store=STORE, host=HOST, port=PORT):
    """Serve the demo model from a local tracking server; return gunicorn's exit status.

    A tracking server already answering at ``host:port`` is used as it is and left running;
    one started here is stopped on exit, Ctrl-C and SIGTERM included, and so is gunicorn: at
    any moment, even while they start, and even when this process is killed (they get SIGTERM).
    """
    from service import mlflow_store

    url = tracking_server_url(host, port)
    with Supervisor() as children:
        if tracking_server_answers(url):
            log.info("using the MLflow tracking server already running at %s (it keeps running)", url)
            stops = "Ctrl-C stops the service; the tracking server, started elsewhere, keeps running"
        else:
            _check_tracking_port(host, port, f"MLFLOW_PORT={port + 1} make serve (or --mlflow-port {port + 1})")
            start_tracking_server(store, host, port, children=children)
            stops = "Ctrl-C stops the service and the tracking server"
        tracking = mlflow_store.connect(url)
        ensure_demo_run(tracking)
        log.info("serving %s; MLflow UI at %s; %s", DEMO_URI, url, stops)
        log.info(
            "to roll out a new version: make train TRAIN_ARGS=\"--register-name %s --alias %s\" "
            "(served within PRED_MODEL_POLL_SECONDS, no restart)", DEMO_MODEL_NAME, DEMO_ALIAS,
        )
        gunicorn = children.start(
            GUNICORN,
            cwd=PROJECT_ROOT,
            env=child_environment({
                "PRED_MODEL_URI": DEMO_URI, "MLFLOW_TRACKING_URI": url, "MODELS_DIR": models_dir,
                "PRED_MODEL_PATH": None, "PRED_MODEL_UUID": None,
            }),
            stdin=subprocess.DEVNULL,
        )
        return gunicorn.wait()


def exec_gunicorn():
    """Replace this process with gunicorn serving the configured model, exactly as deployed."""
    os.chdir(PROJECT_ROOT)
    os.execv(GUNICORN[0], GUNICORN)
