"""Load and faults against real gunicorn on loopback, each bounded in time.

The load comes from threads that post a digit over fresh connections with prebuilt bytes (cheap
enough for one core to keep two workers busy); every request carries its own X-Request-ID, so
each outcome can be matched with what the server logged about it. No assertion is on speed.
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from itertools import count

import psutil
import pytest
import requests

from tests import images
from tests.support import GUNICORN_CMD, ROOT, SERVICE_VARIABLES, multipart_body, run_gunicorn, wait_for_workers

pytestmark = pytest.mark.slow

# None removes a variable from the server's environment; run_gunicorn sets WEB_CONCURRENCY itself.
CLEAN = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
_BODY, _CONTENT_TYPE = multipart_body([(b"image_file", b"digit.png", images.png())])
# "request started" lines, which gunicorn's pre_request hook logs at DEBUG with the request's id.
STARTED = re.compile(r"DEBUG \[(?P<pid>\d+)\] gunicorn\.error \[(?P<id>[^\]]+)\] POST /api/v1/model/predict$", re.M)
ANSWERED = re.compile(r'"POST /api/v1/model/predict HTTP/1\.1" (?P<status>\d+) .* request_id=(?P<id>\S+)$', re.M)


def request_bytes(request_id, body=_BODY):
    head = (
        "POST /api/v1/model/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: {_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Outcome:
    request_id: str
    started: float
    finished: float
    status: int | None = None  # None: no complete HTTP answer (refused, reset, cut short)
    error: str = ""

    @property
    def ok(self):
        return self.status == 200 and not self.error


def read_answer(sock):
    """Read one HTTP answer to the end; return (status, error). Complete means the whole body came."""
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    if not match:
        return None, f"no HTTP answer ({len(answer)} bytes)"
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
    if not length or int(length.group(1)) != len(body):
        return None, f"answer cut short ({len(body)} body bytes)"
    if int(match.group(1)) == 200 and b'"prediction"' not in body:
        return None, f"a 200 without a prediction: {body[:200]!r}"
    return int(match.group(1)), ""


def post_digit(port, request_id, timeout=60):
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request_bytes(request_id))
            status, error = read_answer(sock)
    except OSError as exc:
        status, error = None, f"{exc.__class__.__name__}: {exc}"
    return Outcome(request_id, started, time.monotonic(), status, error)


class Load:
    """``clients`` threads posting digits to ``port`` until stopped or ``total`` requests are done."""

    def __init__(self, port, clients, total=None, prefix="load"):
        self.port, self.total, self.prefix = port, total, prefix
        self.outcomes = []
        self._ids = count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self):
        while not self._stop.is_set():
            with self._lock:
                number = next(self._ids)
            if self.total is not None and number >= self.total:
                return
            outcome = post_digit(self.port, f"{self.prefix}-{number}")
            with self._lock:
                self.outcomes.append(outcome)
            if not outcome.ok:
                time.sleep(0.05)  # as a client would back off, rather than spin on a closed port

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self._threads), "the load did not finish in time"

    def __exit__(self, *exc_info):
        self._stop.set()
        self.wait(120)

    def wait_for(self, done, timeout=60):
        """Wait until ``done`` requests have an outcome."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < done:
            assert time.monotonic() < deadline, f"only {len(self.outcomes)} of {done} requests done"
            time.sleep(0.05)

    def failures(self):
        return [outcome for outcome in self.outcomes if not outcome.ok]


def port_of(server):
    return int(server.url.rsplit(":", 1)[1])


def rss(pids):
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


# -- load ---------------------------------------------------------------------------------------


def test_32_clients_for_30_seconds_without_a_failure(tmp_path, tiny_checkpoint):
    with run_gunicorn(tmp_path, env={**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint}) as server:
        with Load(port_of(server), clients=32) as load:
            time.sleep(30)
        answered = len(load.outcomes)
        assert answered > 32
        assert load.failures() == [], f"{len(load.failures())} of {answered} failed: {load.failures()[:5]}"
        assert requests.get(server.url + "/health/ready", timeout=30).status_code == 200
        assert "Traceback" not in server.log()


def test_worker_memory_is_flat_over_20000_requests(tmp_path, tiny_checkpoint):
    # No recycling during the measurement: the same two processes are measured throughout.
    env = {**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint, "GUNICORN_MAX_REQUESTS": "1000000"}
    with run_gunicorn(tmp_path, env=env) as server:
        workers = wait_for_workers(server.process, 2)
        with Load(port_of(server), clients=8, total=1_000, prefix="warm") as load:
            load.wait(120)
        assert load.failures() == []
        after_1000 = rss(workers)
        with Load(port_of(server), clients=8, total=19_000) as load:
            load.wait(170)
        assert load.failures() == [], load.failures()[:5]
        assert wait_for_workers(server.process, 2) == workers
        after_20000 = rss(workers)
    for pid in workers:
        growth = after_20000[pid] / after_1000[pid] - 1
        assert abs(growth) <= 0.10, f"worker {pid}: {after_1000[pid]} -> {after_20000[pid]} bytes ({growth:+.1%})"


# -- faults -------------------------------------------------------------------------------------


def test_a_killed_worker_is_replaced_and_only_its_request_fails(tmp_path, tiny_checkpoint):
    env = {**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint, "LOG_LEVEL": "DEBUG"}
    with run_gunicorn(tmp_path, env=env) as server:
        workers = wait_for_workers(server.process, 2)
        victim = min(workers)
        with Load(port_of(server), clients=8) as load:
            load.wait_for(200)
            sent = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            replaced = wait_for_workers(server.process, 2, exclude={victim})
            load.wait_for(len(load.outcomes) + 200)  # and the load goes on, served by both
        for _ in range(10):
            assert requests.get(server.url + "/health/ready", timeout=30).status_code == 200
        log = server.log()

    assert len(replaced - workers) == 1
    assert f"Worker (pid:{victim}) was sent SIGKILL!" in log
    answered = {m["id"] for m in ANSWERED.finditer(log)}
    in_flight = {m["id"] for m in STARTED.finditer(log) if int(m["pid"]) == victim} - answered
    failed = load.failures()
    # A sync worker serves one request at a time: what it held is all that can be lost. Killed
    # after accepting a connection but before its pre_request hook logged the request, it held
    # one that its log never names.
    assert len(in_flight) <= 1 and len(failed) <= 1, (in_flight, failed)
    assert not in_flight or {outcome.request_id for outcome in failed} <= in_flight, failed
    assert all(outcome.started < killed and outcome.finished > sent for outcome in failed), (sent, killed, failed)
    assert all(outcome.status is None for outcome in failed)  # lost, never answered with an error
    assert len(load.outcomes) > 400


def test_sigterm_lets_accepted_requests_finish(tmp_path, tiny_checkpoint):
    graceful_timeout = 20
    env = {
        **CLEAN,
        "PRED_MODEL_PATH": tiny_checkpoint,
        "LOG_LEVEL": "DEBUG",
        "GUNICORN_GRACEFUL_TIMEOUT": graceful_timeout,
    }
    with run_gunicorn(tmp_path, env=env) as server:
        wait_for_workers(server.process, 2)
        with Load(port_of(server), clients=8) as load:
            load.wait_for(100)
            # A request a worker has accepted and is still reading: its body is only half sent.
            slow = socket.create_connection(("127.0.0.1", port_of(server)), timeout=60)
            whole = request_bytes("slow-upload")
            slow.sendall(whole[: len(whole) - len(_BODY) // 2])
            deadline = time.monotonic() + 30
            while "[slow-upload] POST" not in server.log():
                assert time.monotonic() < deadline, "no worker took the slow upload"
                time.sleep(0.05)

            server.process.send_signal(signal.SIGTERM)
            terminated = time.monotonic()
            time.sleep(1)  # the shutdown is under way while the upload is still arriving
            slow.sendall(whole[len(whole) - len(_BODY) // 2 :])
            status, error = read_answer(slow)
            slow_done = time.monotonic()
            slow.close()
            exit_code = server.process.wait(timeout=graceful_timeout + 30)
            stopped = time.monotonic()
        log = server.log()

    assert (status, error) == (200, "")
    assert slow_done - terminated < graceful_timeout
    assert exit_code == 0 and stopped - terminated < graceful_timeout + 5
    assert "WORKER TIMEOUT" not in log and "SIGKILL" not in log
    accepted = {m["id"] for m in STARTED.finditer(log)}
    assert len(accepted) > 100
    lost = [outcome for outcome in load.outcomes if outcome.request_id in accepted and not outcome.ok]
    assert lost == []  # refused connections after the listener closed are fine; losing accepted ones is not
    assert any(outcome.started > terminated for outcome in load.outcomes)  # the load did go on


# -- recycling ----------------------------------------------------------------------------------


def test_max_requests_with_jitter_is_configured():
    environment = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES and not k.startswith("GUNICORN")}
    printed = subprocess.run(
        [*GUNICORN_CMD, "--print-config"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert printed.returncode == 0, printed.stderr
    effective = dict(re.findall(r"^(\w+)\s+= (.*)$", printed.stdout, re.M))
    max_requests, jitter = int(effective["max_requests"]), int(effective["max_requests_jitter"])
    assert max_requests > 0 and 0 < jitter < max_requests


def test_workers_recycled_by_max_requests_drop_nothing(tmp_path, tiny_checkpoint):
    env = {
        **CLEAN,
        "PRED_MODEL_PATH": tiny_checkpoint,
        "GUNICORN_MAX_REQUESTS": "40",
        "GUNICORN_MAX_REQUESTS_JITTER": "10",
    }
    with run_gunicorn(tmp_path, env=env) as server:
        first = wait_for_workers(server.process, 2)
        with Load(port_of(server), clients=4, total=200) as load:
            load.wait(120)
        now = wait_for_workers(server.process, 2)
        log = server.log()
    assert load.failures() == [], load.failures()[:5]
    # 200 requests over two workers of at most 50 each: at least two restarts, whatever the split.
    assert log.count("Autorestarting worker after current request.") >= 2
    assert first - now
