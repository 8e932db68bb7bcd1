"""Start-up failures a newcomer meets explain themselves: ports in use, a missing GPU, Ctrl-C."""

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import requests
import torch

from config.settings import child_environment, gunicorn_binds
from service import demo
from tests import images
from tests.support import BIN, ROOT, free_port


@contextmanager
def taken_port():
    """A loopback port that another program listens on (and never answers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def flask_model(*args, env, timeout=60):
    """``flask --app wsgi model ARGS``, as ``make serve`` and ``make mlflow`` run it; return the finished process."""
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "model", *args],
        cwd=ROOT, env=child_environment({"PYTHONUNBUFFERED": "1", **env}), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )
    result.seconds = time.monotonic() - started
    return result


def test_gunicorn_binds_follow_port_and_gunicorn_cmd_args():
    assert gunicorn_binds({}) == [("0.0.0.0", 8080, "PORT")]
    assert gunicorn_binds({"PORT": "9000"}) == [("0.0.0.0", 9000, "PORT")]
    flags = "--workers 3 --bind 127.0.0.1:9001 -b unix:/run/app.sock --bind=[::1]:9002 -blocalhost"
    assert gunicorn_binds({"PORT": "9000", "GUNICORN_CMD_ARGS": flags}) == [
        ("127.0.0.1", 9001, "GUNICORN_CMD_ARGS"), ("::1", 9002, "GUNICORN_CMD_ARGS"),
        ("localhost", 8000, "GUNICORN_CMD_ARGS"),
    ]


def test_a_port_is_in_use_only_while_something_listens_on_it():
    with taken_port() as port:
        assert demo.port_in_use("127.0.0.1", port)
        assert demo.port_in_use("0.0.0.0", port), "gunicorn's 0.0.0.0 bind collides with a loopback listener"
    assert not demo.port_in_use("127.0.0.1", port)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["configured", "demo"])
def test_serve_on_a_taken_port_says_which_port_to_use_before_anything_starts(model, tiny_checkpoint):
    env = {"PRED_MODEL_PATH": str(tiny_checkpoint) if model == "configured" else None, "PRED_MODEL_URI": None}
    with taken_port() as port, taken_port() as mlflow_port:
        result = flask_model("serve", "--mlflow-port", str(mlflow_port), env={**env, "PORT": str(port)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: port {port} is already in use: stop what is using it, or serve on another port: "
        f"PORT={port + 1} make serve"
    ]
    assert result.seconds < 30


@pytest.mark.slow
def test_the_demo_names_mlflow_port_when_its_tracking_port_is_taken():
    env = {"PRED_MODEL_PATH": None, "PRED_MODEL_URI": None, "PORT": str(free_port())}
    with taken_port() as mlflow_port:
        result = flask_model("serve", "--mlflow-port", str(mlflow_port), env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: port {mlflow_port} on 127.0.0.1 is in use by another program, not an MLflow tracking server: "
        f"stop it, or run the tracking server on another port: MLFLOW_PORT={mlflow_port + 1} make serve "
        f"(or --mlflow-port {mlflow_port + 1})"
    )
    assert "exited with" not in result.stderr


@pytest.mark.slow
def test_the_demo_with_another_tracking_server_set_says_how_to_serve_from_it():
    mlflow_port = free_port()
    env = {
        "PRED_MODEL_PATH": None, "PRED_MODEL_URI": None, "PORT": str(free_port()),
        "MLFLOW_TRACKING_URI": "https://alice:s3cret@mlflow.example.com",
    }
    result = flask_model("serve", "--mlflow-port", str(mlflow_port), env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: MLFLOW_TRACKING_URI is https://mlflow.example.com and no model is configured: serve one from that "
        "server with PRED_MODEL_URI=models:/<name>@<alias> make serve, or unset MLFLOW_TRACKING_URI for the local demo"
    ]
    assert not demo.port_in_use("127.0.0.1", mlflow_port), "no tracking server was started"


@pytest.mark.parametrize(
    ("configured", "port"),
    [(None, 5000), ("http://127.0.0.1:5000", 5000), ("http://localhost:5000/", 5000), ("http://127.0.0.1:5001", 5001)],
)
def test_the_demo_takes_a_tracking_uri_naming_its_own_server(configured, port):
    demo.check_tracking_uri(configured, "127.0.0.1", port)


@pytest.mark.parametrize("configured", ["http://127.0.0.1:5001", "sqlite:///mlflow.db", "https://mlflow.example.com"])
def test_the_demo_refuses_a_tracking_uri_naming_another(configured):
    with pytest.raises(demo.DemoError, match="no model is configured"):
        demo.check_tracking_uri(configured, "127.0.0.1", 5000)


@pytest.mark.slow
def test_the_tracking_server_command_names_port_when_its_port_is_taken():
    with taken_port() as port:
        result = flask_model("tracking-server", "--port", str(port), env={})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: port {port} on 127.0.0.1 is in use by another program, not an MLflow tracking server: "
        f"stop it, or run the tracking server on another port: MLFLOW_PORT={port + 1} make mlflow (or --port {port + 1})"
    )


@pytest.mark.slow
def test_ctrl_c_stops_the_tracking_server_without_a_traceback(tmp_path):
    port = free_port()
    # What `make mlflow` runs, with the store in a temporary folder.
    code = (
        "import sys; from service import demo; "
        f"sys.exit(demo.run_tracking_server({str(tmp_path / 'store')!r}, '127.0.0.1', {port}))"
    )
    log_path = tmp_path / "output.log"
    with open(log_path, "wb") as log_file:
        # Its own process group, as a terminal's foreground job: Ctrl-C signals the whole group.
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
            env=child_environment({"PYTHONUNBUFFERED": "1"}), start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while not demo.tracking_server_answers(url):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        # A browser tab on the UI keeps a connection open: that is when uvicorn's SIGINT path printed
        # an asyncio traceback.
        with socket.create_connection(("127.0.0.1", port)) as browser:
            browser.sendall(b"GET /ajax-api/2.0/mlflow/experiments/search?max_results=1 HTTP/1.1\r\nHost: x\r\n")
            time.sleep(1)
            os.killpg(process.pid, signal.SIGINT)
            status = process.wait(timeout=60)
    finally:
        demo.stop(process)
    output = log_path.read_text()
    assert status == 130, output
    assert "Traceback" not in output and "CancelledError" not in output, output
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=2)


def test_use_cuda_without_a_gpu_is_a_warning(monkeypatch, caplog, make_app):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the service uses it")
    monkeypatch.setenv("USE_CUDA", "1")
    caplog.set_level(logging.INFO)
    client = make_app().test_client()
    assert client.post("/api/v1/model/predict", data={"image_file": (io.BytesIO(images.png(0)), "0.png")}).status_code == 200
    (record,) = [r for r in caplog.records if r.getMessage().startswith("serving on ")]
    assert record.levelno == logging.WARNING
    assert "USE_CUDA is set but CUDA is not available" in record.getMessage()
