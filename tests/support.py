"""Shared test code: images, model files and real server processes."""

import http.server
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from PIL import Image

from config.settings import Settings, child_environment
from service import demo
from service.architectures import DigitCNN
from service.demo import stop  # noqa: F401  (tests stop the servers they start the same way)

ROOT = Path(__file__).resolve().parent.parent
# The environment variables the service reads; tests start with none of them set.
SERVICE_VARIABLES = tuple(f.name for f in fields(Settings)) + (
    "WEB_CONCURRENCY", "TORCH_NUM_THREADS", "MLFLOW_TRACKING_URI",
)
BIN = Path(sys.executable).parent
GUNICORN_CMD = [str(BIN / "gunicorn"), "-c", "config/gunicorn.conf.py", "wsgi:app"]


def free_port():
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encode(image, fmt="PNG", **params):
    """Return the bytes of a PIL image saved in ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


MULTIPART_BOUNDARY = "test-boundary-7f3a9c"


def multipart_body(parts, boundary=MULTIPART_BOUNDARY):
    """Build a multipart/form-data body byte for byte: ``parts`` are (name, filename, data).

    Names and filenames are bytes and go out exactly as given (no quoting, no encoding), so a
    test can send what a hostile client would; a None filename makes a plain form field.
    Returns the body and its Content-Type.
    """
    delimiter = b"--" + boundary.encode()
    chunks = []
    for name, filename, data in parts:
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        chunks.append(delimiter + b"\r\n" + disposition + b"\r\nContent-Type: application/octet-stream\r\n\r\n" + data)
    body = b"\r\n".join(chunks) + b"\r\n" + delimiter + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}"


def digit_image(index=0, size=28):
    """A real handwritten digit (scikit-learn's bundled set) as a white-on-black grayscale image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    return image.resize((size, size), Image.Resampling.BILINEAR), str(digits.target[index])


def digit_batch(indices=(0, 1, 2)):
    """Digits as the template's network takes them: Nx1x28x28 in [0, 1], built without the service."""
    pixels = [np.asarray(digit_image(i)[0], dtype=np.float32) / 255.0 for i in indices]
    return torch.from_numpy(np.stack(pixels)[:, None])


def template_probabilities(state_dict, batch, num_classes=10):
    """Class probabilities the template's network, in eval mode, gives each image of ``batch``."""
    model = DigitCNN(num_classes)
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        return torch.exp(model(batch))


def write_template_checkpoint(path, seed=0, **extras):
    """Write a checkpoint shaped like the template's (random weights) and return its path."""
    torch.manual_seed(seed)
    model = DigitCNN()
    optimiser = torch.optim.Adadelta(model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "epoch": 1,
            "model_state_dict": model.state_dict(),
            "optimiser_state_dict": optimiser.state_dict(),
            "train_loss": 0.5,
            "test_loss": 0.4,
            **extras,
        },
        path,
    )
    return path


def write_network_checkpoint(path, network, **metadata):
    """Write ``network``'s weights with ``metadata`` (architecture, labels...) as a checkpoint; return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": network.state_dict(), "metadata": metadata}, path)
    return path


def flask(*args):
    """Run ``flask --app wsgi <args>`` as a user would, with no model configured, whatever .env says."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env.update(PRED_MODEL_PATH="", PRED_MODEL_URI="")
    return subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@contextmanager
def project_package(tmp_path, monkeypatch, prefix, nets_source):
    """A project's own package ``<prefix>_<n>`` whose ``nets`` module is ``nets_source``, importable
    from sys.path inside the block and forgotten by the import system after it: (name, folder)."""
    name = f"{prefix}_{tmp_path.name[-12:].replace('-', '_')}"
    package = tmp_path / "src" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(nets_source)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    try:
        yield name, package
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


@dataclass
class Server:
    """A running server process and where to reach it."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern, count=1, timeout=60):
        """Poll the log until the regular expression ``pattern`` matches ``count`` times; return the log.

        A worker writes a request's access line after the answer has gone out, so a client that
        has its answer may look before the line is there.
        """
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, log := self.log())) < count:
            assert time.monotonic() < deadline, f"{pattern!r} not logged {count} times:\n{log}"
            assert self.process.poll() is None, log
            time.sleep(0.05)
        return log


def wait_until_ready(url, process, log_path, timeout=60.0, path="/health/ready"):
    """Poll ``url + path`` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            if requests.get(url + path, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout}s:\n{log_path.read_text(errors='replace')}")


def wait_for_workers(process, count, timeout=60.0, exclude=()):
    """Wait until gunicorn's master ``process`` has ``count`` workers (none in ``exclude``); return their pids."""
    master = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {child.pid for child in master.children()}
        if len(pids) == count and not pids & set(exclude):
            return pids
        time.sleep(0.1)
    raise AssertionError(f"gunicorn has workers {pids}, expected {count} new to {set(exclude)}")


@contextmanager
def run_gunicorn(tmp_path, env=None, workers=2, ready=True, timeout=60.0):
    """Start gunicorn exactly as deployed (config/gunicorn.conf.py) on a free loopback port.

    ``env`` adds to (or, with None values, removes from) the environment. The server is always
    stopped, and its combined output is kept in a log file for assertions and failures.
    """
    port = free_port()
    environment = child_environment(
        {
            "WEB_CONCURRENCY": workers,
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
    )
    log_path = tmp_path / f"gunicorn-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            GUNICORN_CMD, cwd=ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        if ready:
            wait_until_ready(server.url, process, log_path, timeout)
        yield server
    finally:
        stop(process)


@contextmanager
def mlflow_server(store, env=None, app_name=None, port=None, artifact_root=None):
    """Run ``mlflow server`` as ``make mlflow`` does, on a free loopback port (or ``port``) with its
    store in ``store``; with ``artifact_root`` (``s3://...``, ``gs://...``), runs keep their artifacts
    there and the server does not proxy them: clients read and write the store themselves.

    The server is always stopped.
    """
    store.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = demo.tracking_server_command(store, "127.0.0.1", port)
    if artifact_root:
        proxied = command.index("--artifacts-destination")
        command[proxied:proxied + 3] = ["--default-artifact-root", artifact_root, "--no-serve-artifacts"]
    if app_name:
        command += ["--app-name", app_name]
    environment = {**os.environ, **demo.TRACKING_SERVER_ENV, **(env or {})}
    log_path = store / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=store, env=environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log_path, timeout=180, path="/health")
        yield url
    finally:
        stop(process)


@dataclass
class Demo:
    """``make serve``'s supervisor serving the demo: its process, its gunicorn and tracking server ports."""

    process: subprocess.Popen
    port: int
    mlflow_port: int
    log_path: Path

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def log(self):
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve_demo(store, tmp_path, env=None, mlflow_port=None):
    """Run ``flask --app wsgi model serve`` (what ``make serve`` runs) with no model configured, on free
    ports (or the tracking server's ``mlflow_port``), with the demo's tracking store in ``store``: in a
    process group of its own, as a terminal's foreground job. Stopped (with everything it started)
    when the block ends."""
    port, mlflow_port = free_port(), mlflow_port or free_port()
    log_path = tmp_path / f"serve-{port}.log"
    environment = child_environment({
        **{name: None for name in SERVICE_VARIABLES},
        "PORT": port, "MODELS_DIR": tmp_path / "models", "PYTHONUNBUFFERED": "1", "WEB_CONCURRENCY": 2,
        **(env or {}),
    })
    command = [
        str(BIN / "flask"), "--app", "wsgi", "model", "serve",
        "--mlflow-port", str(mlflow_port), "--mlflow-store", str(store),
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Demo(process, port, mlflow_port, log_path)
    finally:
        stop(process, timeout=60)


def running(pids):
    """The pids of ``pids`` that still run (a zombie waiting to be reaped has stopped)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


class Hold:
    """Holds a cut transfer midway: ``reached`` is set once half of it is sent, and the connection
    drops only once the test sets ``release`` (meanwhile it may stop the tracking server)."""

    def __init__(self):
        self.reached, self.release = threading.Event(), threading.Event()


class _CuttingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards requests to the tracking server, but breaks transfers of a model.pt midway (every
    one, or the first ``cuts_left``). While the tracking server is down, a request gets no answer."""

    upstream = None
    mode = "dropped"
    cuts_left = None
    hold = None

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            upstream = requests.request(
                self.command,
                self.upstream + self.path,
                data=self.rfile.read(length) if length else None,
                headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
                timeout=30,
            )
        except requests.RequestException:  # the tracking server is down: as if the proxy were too
            self.close_connection = True
            return
        body = upstream.content
        cut = self.command == "GET" and self.path.split("?")[0].endswith("/model.pt")
        cut = cut and (self.cuts_left is None or self.cuts_left > 0)
        if cut and self.cuts_left is not None:
            type(self).cuts_left -= 1
        self.send_response(upstream.status_code)
        self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/octet-stream"))
        if cut and self.mode == "truncated":
            body = body[: len(body) // 2]  # a clean, complete-looking response that is too short
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut and self.mode in ("dropped", "held"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if self.hold is not None:
                self.hold.reached.set()
                self.hold.release.wait(120)
            if self.mode == "dropped":  # the connection drops
                self.close_connection = True
                return
            body = body[len(body) // 2 :]  # held: a slow transfer that ends whole
        self.wfile.write(body)

    do_GET = do_POST = _forward

    def log_message(self, *args):
        pass


@contextmanager
def cutting_proxy(upstream, mode, cuts=None, hold=None):
    """A proxy to the tracking server ``upstream`` that cuts model transfers (``mode``: the
    connection ``dropped``, or a ``truncated`` answer, or only ``held``), every one or the first
    ``cuts``; a dropped or held one waits for ``hold`` (a :class:`Hold`) midway."""
    handler = type("Handler", (_CuttingProxy,), {"upstream": upstream, "mode": mode, "cuts_left": cuts, "hold": hold})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
