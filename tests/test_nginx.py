"""deploy/nginx.conf in front of real gunicorn: real nginx on a free loopback port.

nginx runs as the current user with everything it writes (pid, temporary files, logs) in the
test's folder; the site file is the deployed one with its two placeholders filled in.
"""

import concurrent.futures
import io
import json
import re
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import requests
from werkzeug.exceptions import default_exceptions

from config import settings
from tests.images import png
from bench.run import Nginx
from tests.support import ROOT, run_gunicorn, stop

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
PREDICT = "/api/v1/model/predict"
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")  # nginx's $request_id

pytestmark = pytest.mark.slow


@contextmanager
def run_nginx(folder, upstream):
    """nginx with deploy/nginx.conf in front of ``upstream``, as the benchmark runs it, its
    configuration checked first and its error log at info; always stopped."""
    with Nginx(folder, upstream, log_level="info", check_config=True) as nginx:
        yield nginx.url, nginx.access_log


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint):
    """Real gunicorn (as deployed) behind real nginx (deploy/nginx.conf)."""
    folder = tmp_path_factory.mktemp("nginx")
    with run_gunicorn(folder, env={"PRED_MODEL_PATH": tiny_checkpoint}) as gunicorn:
        with run_nginx(folder / "nginx", gunicorn.url.removeprefix("http://")) as (url, access_log):
            yield url, gunicorn, access_log


def wait_for_line(read, needle, timeout=10.0):
    """Return the log text once it contains ``needle`` (processes flush on their own schedule)."""
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def assert_json_error(response, code):
    assert response.status_code == code, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    # The shape of the service's own errors (flask-smorest): code, HTTP status name, message.
    assert body["code"] == code
    assert body["status"] == default_exceptions[code]().name
    assert body["message"]
    assert GENERATED_ID.match(response.headers["X-Request-ID"])


def test_predicts_through_nginx(stack):
    url, _, _ = stack
    response = requests.post(url + PREDICT, files={"image_file": ("digit.png", png(0), "image/png")}, timeout=30)
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert item["image_filename"] == "digit.png"
    assert item["prediction"] in [str(d) for d in range(10)]
    assert "," not in response.headers["X-Request-ID"], "one request id, not nginx's and gunicorn's"


def test_a_sent_request_id_reaches_gunicorn_and_comes_back(stack):
    url, gunicorn, access_log = stack
    sent = "client-7f3a.42"
    response = requests.post(
        url + PREDICT, files={"image_file": ("d.png", png(1))}, headers={"X-Request-ID": sent}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == sent
    assert f"request_id={sent}" in wait_for_line(gunicorn.log, f"request_id={sent}")
    assert f"request_id={sent}" in wait_for_line(access_log.read_text, f"request_id={sent}")


def test_a_missing_request_id_is_generated_and_is_the_one_gunicorn_logged(stack):
    url, gunicorn, access_log = stack
    response = requests.post(url + PREDICT, files={"image_file": ("d.png", png(2))}, timeout=30)
    assert response.status_code == 200, response.text
    generated = response.headers["X-Request-ID"]
    assert GENERATED_ID.match(generated)
    assert f"request_id={generated}" in wait_for_line(gunicorn.log, f"request_id={generated}")
    assert f"request_id={generated}" in wait_for_line(access_log.read_text, f"request_id={generated}")


def test_an_unsafe_request_id_is_replaced_before_it_reaches_gunicorn(stack):
    url, gunicorn, _ = stack
    unsafe = "x" * 200  # longer than the service keeps
    response = requests.get(url + "/health/live", headers={"X-Request-ID": unsafe}, timeout=30)
    assert response.status_code == 200
    replaced = response.headers["X-Request-ID"]
    assert GENERATED_ID.match(replaced)
    assert f"request_id={replaced}" in wait_for_line(gunicorn.log, f"request_id={replaced}")


def test_body_limit_equals_the_service_limit_and_over_it_nginx_answers_json_413(stack):
    url, gunicorn, _ = stack
    limit = settings.Settings.MAX_CONTENT_LENGTH
    boundary = "limitboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image_file"; filename="big.png"\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}

    def body(size):
        return head + b"\0" * (size - len(head) - len(tail)) + tail

    # At the limit nginx passes the body on; the service reads it and refuses the junk image.
    at_limit = requests.post(url + PREDICT, data=body(limit), headers=headers, timeout=60)
    assert at_limit.status_code == 422, at_limit.text
    assert "big.png" in at_limit.json()["message"]

    over = requests.post(url + PREDICT, data=body(limit + 1), headers=headers, timeout=60)
    assert_json_error(over, 413)
    assert str(limit) in over.json()["message"], "the limit, in the words the service uses"
    request_id = over.headers["X-Request-ID"]
    time.sleep(0.5)
    assert request_id not in gunicorn.log(), "nginx refused it: gunicorn never saw it"


def test_gunicorn_down_gives_json_502(tmp_path, tiny_checkpoint):
    with run_gunicorn(tmp_path, env={"PRED_MODEL_PATH": tiny_checkpoint}, workers=1) as gunicorn:
        with run_nginx(tmp_path / "nginx", gunicorn.url.removeprefix("http://")) as (url, _):
            assert requests.get(url + "/health/ready", timeout=30).status_code == 200
            stop(gunicorn.process)
            down = requests.post(url + PREDICT, files={"image_file": ("d.png", io.BytesIO(png(0)))}, timeout=30)
            assert_json_error(down, 502)


def test_nginx_own_errors_are_json_in_the_service_shape():
    """Each error_page of the conf points at a JSON answer with the right code (504 included)."""
    text = NGINX_CONF.read_text()
    handled = {}
    for codes, answered, location in re.findall(r"error_page\s+([\d ]+?)\s+(?:=(\d{3})\s+)?(@\w+|/\S+);", text):
        for code in codes.split():
            handled.setdefault(answered or code, set()).add(location)
    assert {"400", "413", "414", "431", "502", "504"} <= set(handled)
    for code, locations in handled.items():
        (location,) = locations
        block = re.search(rf"location (?:= )?{re.escape(location)} \{{(.*?)\n    \}}", text, re.S).group(1)
        assert "default_type application/json;" in block
        assert location.startswith("@") or "internal;" in block, "an error answer must not be a URL clients reach"
        status, payload = re.search(r"return (\d{3}) '(.*?)';", block, re.S).groups()
        body = json.loads(payload.replace("\\n", "\n"))
        assert status == code and body["code"] == int(code)
        assert body["status"] == default_exceptions[int(code)]().name and body["message"]


def raw_request(url, data, timeout=10):
    """Send ``data`` as it is on one connection and return the parsed answer (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("what", "request_bytes", "status"),
    [
        ("a malformed request line", b"GARBAGE\r\n\r\n", 400),
        ("a made-up method", b"M000001 /health/live HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("a URL of 5000 bytes", b"GET /" + b"u" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        ("a header of 9 KB", b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
        (
            "1000 headers",
            b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n",
            431,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_requests_over_the_http_limits_get_json_errors(stack, what, request_bytes, status):
    url, _, _ = stack
    code, headers, body = raw_request(url, request_bytes.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
    assert code == status, body[:300]
    assert headers["content-type"] == ["application/json"], (headers, body[:300])
    parsed = json.loads(body)
    assert parsed["code"] == status and parsed["status"] == default_exceptions[status]().name and parsed["message"]
    assert headers["x-content-type-options"] == ["nosniff"]


def test_no_url_length_reaches_gunicorn_limits_unanswered_in_json(stack):
    """Around gunicorn's request-line limit (4094 bytes) every answer is the service's or nginx's JSON."""
    url, _, _ = stack
    for length in range(4060, 4110, 3):
        path = "/" + "p" * (length - len("GET / HTTP/1.1") - 1)
        code, headers, body = raw_request(url, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert code in (404, 414) and headers["content-type"] == ["application/json"], (length, code, body[:200])


def test_the_service_own_errors_pass_through_nginx_unchanged(stack):
    url, _, _ = stack
    parts = b"".join(b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n' for _ in range(1001))
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    many = requests.post(url + PREDICT, data=parts + b"--b--\r\n", headers=headers, timeout=30)
    assert many.status_code == 422 and "more than 1000 parts" in many.json()["message"]
    malformed = requests.post(url + PREDICT, data=b"x", headers={"Content-Type": "multipart/form-data"}, timeout=30)
    assert malformed.status_code == 400 and "boundary" in malformed.json()["message"], malformed.text


def test_every_answer_through_nginx_forbids_content_sniffing_once(stack):
    url, _, _ = stack
    for response in (
        requests.get(url + "/health/live", timeout=30),
        requests.post(url + PREDICT, files={"image_file": ("<b>x</b>.png", png(0))}, timeout=30),
        requests.get(url + "/nowhere", timeout=30),
        requests.get(url + "/.errors/400", timeout=30),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff", response.headers
        assert response.headers["Content-Type"].startswith("application/json"), response.text


def test_nginx_error_answers_are_not_reachable_as_urls(stack):
    url, _, _ = stack
    assert_json_error(requests.get(url + "/.errors/431", timeout=30), 404)


class SlowClients:
    """Connections that each hold a request open without finishing it, the slowloris way.

    Every kind a sync worker waits on: headers sent one byte at a time, half a request line and
    then nothing, a body shorter than its Content-Length. They stop when the context exits.
    """

    KINDS = (
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # then one byte at a time
        b"GET /health/li",  # and nothing more
        b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\n",  # and nothing more
    )

    def __init__(self, url, count):
        host, port = url.removeprefix("http://").split(":")
        self.address, self.count = (host, int(port)), count

    def __enter__(self):
        self.sockets, self.stopping = [], threading.Event()
        for n in range(self.count):
            sock = socket.create_connection(self.address, timeout=5)
            sock.sendall(self.KINDS[n % len(self.KINDS)])
            self.sockets.append(sock)
        self.trickler = threading.Thread(target=self._trickle, daemon=True)
        self.trickler.start()
        return self

    def _trickle(self):
        while not self.stopping.wait(0.5):
            for sock in self.sockets[:: len(self.KINDS)]:  # the header senders
                try:
                    sock.sendall(b"a")
                except OSError:
                    pass  # the server let it go: as it should, in time

    def __exit__(self, *exc):
        self.stopping.set()
        self.trickler.join(timeout=5)
        for sock in self.sockets:
            sock.close()


def good_requests_answered(url, count, timeout):
    """How many of ``count`` good requests, sent together, are answered 200 within ``timeout`` s."""
    def one(index):
        try:
            files = {"image_file": (f"{index}.png", png(index % 10))}
            return requests.post(url + PREDICT, files=files, timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return sum(pool.map(one, range(count)))


def test_slow_clients_cannot_starve_the_workers_behind_nginx(tmp_path, tiny_checkpoint):
    """Slowloris against the entry point the deployment exposes: nginx, with two sync workers behind.

    The same slow clients sent straight at gunicorn hold both of its workers: that is why its
    port is never exposed (Dockerfile, docker-compose.yml, deploy/k8s).
    """
    with run_gunicorn(tmp_path, env={"PRED_MODEL_PATH": tiny_checkpoint}, workers=2) as gunicorn:
        with run_nginx(tmp_path / "nginx", gunicorn.url.removeprefix("http://")) as (url, _):
            with SlowClients(url, count=30):
                time.sleep(1.0)
                assert good_requests_answered(url, count=8, timeout=10) == 8
        with SlowClients(gunicorn.url, count=30):
            time.sleep(1.0)
            assert good_requests_answered(gunicorn.url, count=4, timeout=3) == 0, "the slow clients did nothing"


def test_proxy_timeouts_outlast_gunicorn_and_the_upstream_keeps_connections():
    text = NGINX_CONF.read_text()
    gunicorn_timeout = settings.server_from_env({}).timeout
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = re.findall(rf"{directive}\s+(\d+)s;", text)
        assert int(value) > gunicorn_timeout, f"{directive} must outlast gunicorn's {gunicorn_timeout} s"
    upstream = re.search(r"upstream \w+ \{(.*?)\n\}", text, re.S).group(1)
    assert re.search(r"keepalive\s+\d+;", upstream)
    assert 'proxy_set_header Connection "";' in text and "proxy_http_version 1.1;" in text
    (size,) = re.findall(r"client_max_body_size\s+(\S+);", text)
    assert settings.parse_size(size) == settings.Settings.MAX_CONTENT_LENGTH
