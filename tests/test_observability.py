"""What an operator sees, from real gunicorn: Prometheus metrics merged across workers, request
ids on every answer and every log line, and JSON log lines."""

import hashlib
import json
import threading
import time
import uuid

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests import images
from tests.conftest import RUN_ID
from tests.support import SERVICE_VARIABLES, run_gunicorn, wait_for_workers

pytestmark = pytest.mark.slow

# None removes a variable from the server's environment; run_gunicorn sets WEB_CONCURRENCY itself.
CLEAN = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
PREDICT = "/api/v1/model/predict"
LABELS = [str(d) for d in range(10)]


def scrape(url):
    """Every sample of /metrics, as (name, labels, value)."""
    response = requests.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def total(samples, name, **labels):
    return sum(
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name and labels.items() <= sample_labels.items()
    )


def predict(url, count=1, **params):
    files = [("image_file", (f"d{i}.png", images.png(i))) for i in range(count)]
    return requests.post(url + PREDICT, files=files, params=params, timeout=30)


def worker_predictions(metrics_dir, pid):
    """Predict requests counted by one worker, read from its own multiprocess file."""
    own_file = metrics_dir / f"counter_{pid}.db"
    if not own_file.exists():  # it has counted nothing yet
        return 0
    families = MultiProcessCollector.merge([str(own_file)])
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "http_requests_total" and sample.labels.get("endpoint") == PREDICT
    )


# -- Prometheus ---------------------------------------------------------------------------------


def test_metrics_add_up_across_two_workers(tmp_path, tiny_checkpoint):
    metrics_dir = tmp_path / "metrics"
    env = {**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    with run_gunicorn(tmp_path, env=env, workers=2) as server:
        workers = wait_for_workers(server.process, 2)
        sent, images_sent = 0, 0
        # Concurrent clients until both workers have served predictions (the kernel picks which).
        while sent < 400 and not all(worker_predictions(metrics_dir, pid) for pid in workers):
            batch = [threading.Thread(target=predict, args=(server.url, 1 + i % 3)) for i in range(8)]
            for thread in batch:
                thread.start()
            for thread in batch:
                thread.join()
            sent += len(batch)
            images_sent += sum(1 + i % 3 for i in range(8))
        assert all(worker_predictions(metrics_dir, pid) for pid in workers)
        refused = predict(server.url, top_k=0)
        assert refused.status_code == 422

        samples = scrape(server.url)
        assert total(samples, "http_requests_total", endpoint=PREDICT, method="POST", status="200") == sent
        assert total(samples, "http_requests_total", endpoint=PREDICT, status="422") == 1
        assert sum(worker_predictions(metrics_dir, pid) for pid in workers) == sent + 1
        assert total(samples, "http_request_duration_seconds_count", endpoint=PREDICT, status="200") == sent
        assert total(samples, "http_request_duration_seconds_count", endpoint="/health/ready", status="200") >= 1
        assert total(samples, "model_inference_duration_seconds_count") == sent
        assert total(samples, "model_batch_size_count") == sent
        assert total(samples, "model_batch_size_sum") == images_sent
        by_label = {labels["label"]: value for name, labels, value in samples if name == "model_predictions_total"}
        assert set(by_label) <= set(LABELS) and sum(by_label.values()) == images_sent

        info = [labels for name, labels, value in samples if name == "model_info" and value == 1]
        assert {int(labels["pid"]) for labels in info} == workers
        sha256 = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
        assert all((i["model_uuid"], i["sha256"], i["device"]) == (RUN_ID, sha256, "cpu") for i in info)

        unmatched = requests.get(f"{server.url}/no/such/{uuid.uuid4().hex}", timeout=30)
        assert unmatched.status_code == 404
        # Unknown paths share one label value: a scanner cannot blow up the series count.
        assert total(scrape(server.url), "http_requests_total", endpoint="<unmatched>", status="404") == 1


def test_a_restart_does_not_carry_old_counts(tmp_path, tiny_checkpoint):
    metrics_dir = tmp_path / "metrics"
    env = {**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    with run_gunicorn(tmp_path, env=env) as first:
        for _ in range(5):
            assert predict(first.url).status_code == 200
        assert total(scrape(first.url), "http_requests_total", endpoint=PREDICT) == 5
    assert any(metrics_dir.glob("counter_*.db"))  # the first run's counts are still on disk
    with run_gunicorn(tmp_path, env=env) as second:
        assert total(scrape(second.url), "http_requests_total", endpoint=PREDICT) == 0
        assert predict(second.url).status_code == 200
        assert total(scrape(second.url), "http_requests_total", endpoint=PREDICT) == 1


def test_made_up_methods_and_paths_add_no_time_series(tmp_path, tiny_checkpoint):
    """Every label value comes from a closed set, whatever the clients send."""
    env = {**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint, "PROMETHEUS_MULTIPROC_DIR": tmp_path / "metrics"}
    with run_gunicorn(tmp_path, env=env, workers=1) as server:
        for n in range(150):
            made_up = requests.request(f"M{n:06d}", f"{server.url}{PREDICT if n % 2 else f'/x{n}'}", timeout=30)
            assert made_up.status_code in (404, 405)
        assert requests.request("GET", f"{server.url}/health/live", timeout=30).status_code == 200
        series = {
            (labels["endpoint"], labels["method"], labels["status"])
            for name, labels, _ in scrape(server.url)
            if name == "http_requests_total"
        }
    routes = {"/health/live", "/health/ready", "/metrics", PREDICT, "<unmatched>"}
    assert {method for _, method, _ in series} <= {"GET", "POST", "other"}, series
    assert {endpoint for endpoint, _, _ in series} <= routes, series
    assert len(series) <= 4, f"150 made-up requests made {len(series)} series: {sorted(series)}"


# -- request ids and log lines ------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_logged(tmp_path_factory, tiny_checkpoint):
    """One worker (so its log lines come in request order), JSON lines at DEBUG, an API key."""
    root = tmp_path_factory.mktemp("json-logs")
    private_tmp = root / "tmp"
    private_tmp.mkdir()
    env = {
        **CLEAN,
        "PRED_MODEL_PATH": tiny_checkpoint,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
        "API_KEY": "observability-key",
        "MAX_CONTENT_LENGTH": "20000",
        "TMPDIR": private_tmp,  # where the run's own metrics directory goes, and must be gone from
    }
    with run_gunicorn(root, env=env, workers=1) as server:
        wait_for_workers(server.process, 1)
        yield server, private_tmp


AUTH = {"Authorization": "Bearer observability-key"}
# Each: (what, method, path, request keyword arguments, expected status).
REQUESTS = [
    ("prediction", "POST", PREDICT, {"headers": AUTH, "files": {"image_file": ("d.png", images.png())}}, 200),
    ("rejected image", "POST", PREDICT, {"headers": AUTH, "files": {"image_file": ("t.png", b"text")}}, 422),
    ("no API key", "POST", PREDICT, {"files": {"image_file": ("d.png", images.png())}}, 401),
    ("body too large", "POST", PREDICT, {"headers": AUTH, "files": {"image_file": ("b.png", b"x" * 30000)}}, 413),
    ("unknown path", "GET", "/nowhere", {}, 404),
    ("wrong method", "DELETE", "/health/live", {}, 405),
    ("probe", "GET", "/health/ready", {}, 200),
    ("spec", "GET", "/openapi.json", {}, 200),
]


@pytest.mark.parametrize("what, method, path, kwargs, status", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_a_request_id_is_kept_or_made_and_always_returned(json_logged, what, method, path, kwargs, status):
    server, _ = json_logged
    kwargs = {**kwargs, "headers": dict(kwargs.get("headers", {}))}
    given = f"client-{uuid.uuid4().hex[:8]}:{what.replace(' ', '-')}"
    response = requests.request(method, server.url + path, timeout=30, **kwargs)
    assert response.status_code == status
    made = response.headers["X-Request-ID"]
    assert len(made) == 32 and int(made, 16) >= 0  # none given: a fresh uuid4 hex
    for unsafe in ["has spaces", "x" * 129, '{"json": "injection"}', "<script>"]:
        kwargs["headers"]["X-Request-ID"] = unsafe
        response = requests.request(method, server.url + path, timeout=30, **kwargs)
        assert len(response.headers["X-Request-ID"]) == 32 and response.headers["X-Request-ID"] != made
    kwargs["headers"]["X-Request-ID"] = given
    response = requests.request(method, server.url + path, timeout=30, **kwargs)
    assert response.status_code == status
    assert response.headers["X-Request-ID"] == given


def test_every_log_line_of_a_request_carries_its_id(json_logged):
    server, _ = json_logged
    sent = []
    for what, method, path, kwargs, status in REQUESTS * 2:
        headers = dict(kwargs.get("headers", {}))
        if len(sent) % 2 == 0:  # half with the caller's id, half with one the service makes
            headers["X-Request-ID"] = f"seq-{len(sent)}"
        response = requests.request(method, server.url + path, timeout=30, **{**kwargs, "headers": headers})
        assert response.status_code == status
        sent.append(response.headers["X-Request-ID"])

    # The worker writes a request's access line after the response has gone out: wait for the last.
    deadline = time.monotonic() + 30
    while True:
        text = server.log()
        records = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
        if any(r["name"] == "gunicorn.access" and r.get("request_id") == sent[-1] for r in records):
            break
        assert time.monotonic() < deadline, "the last request's access line was never written"
        time.sleep(0.05)
    first = next(i for i, r in enumerate(records) if r.get("request_id") == sent[0])
    last = max(i for i, r in enumerate(records) if r.get("request_id") == sent[-1])
    window = records[first : last + 1]
    # One worker, one request at a time: the lines come in runs, one run per request, each line
    # with the id of its request, and no line in between without one.
    runs = [r["request_id"] for i, r in enumerate(window) if i == 0 or r["request_id"] != window[i - 1]["request_id"]]
    assert runs == sent, [(r.get("name"), r.get("request_id"), r.get("message", "")[:60]) for r in window]
    for request_id in sent:
        lines = [r for r in window if r["request_id"] == request_id]
        assert [r["name"] for r in lines][0] == "gunicorn.error"  # the server's "request started" line
        assert [r["name"] for r in lines][-1] == "gunicorn.access"
        assert len(lines) >= 2


def test_json_logs_are_one_object_per_line(json_logged):
    server, private_tmp = json_logged
    upload = {"image_file": ("d.png", images.png())}
    assert requests.post(server.url + PREDICT, headers=AUTH, files=upload, timeout=30).ok
    server.process.terminate()  # stop it, so the shutdown lines are in the log too
    assert server.process.wait(timeout=60) == 0
    lines = server.log().splitlines()
    assert len(lines) > 20
    for line in lines:
        record = json.loads(line)  # every line, from start-up to shutdown
        assert isinstance(record, dict) and "message" in record and "asctime" in record and "request_id" in record
    names = {json.loads(line)["name"] for line in lines}
    assert {"gunicorn.error", "gunicorn.access", "service.registry"} <= names
    # The run's own metrics directory (made in TMPDIR, as none was configured) is gone with it.
    assert list(private_tmp.iterdir()) == []


def test_the_metric_files_of_hundreds_of_dead_workers_are_merged_and_their_counts_kept(tmp_path):
    import subprocess
    import sys

    from prometheus_client.parser import text_string_to_metric_families as parse

    from tests.support import ROOT, child_environment

    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    restarts = 300
    master = subprocess.run(
        [sys.executable, "-m", "tests.metrics_workers", str(metrics_dir), str(restarts)],
        cwd=ROOT, env=child_environment({"PROMETHEUS_MULTIPROC_DIR": metrics_dir}), check=True, timeout=300,
        capture_output=True, text=True,
    ).stdout.strip()
    files = sorted(path.name for path in metrics_dir.glob("*.db") if not path.name.endswith(f"_{master}.db"))
    # One file per kind for all the dead workers: not three per worker that ever ran.
    assert files == ["counter_dead.db", "histogram_dead.db"], files

    from service.observability import render_metrics

    body, _ = render_metrics(str(metrics_dir))
    samples = [(s.name, s.labels, s.value) for family in parse(body.decode()) for s in family.samples]
    assert total(samples, "http_requests_total", endpoint="<unmatched>", status="200") == 3 * restarts
    assert total(samples, "http_request_duration_seconds_count", endpoint="<unmatched>") == 3 * restarts
    assert total(samples, "http_request_duration_seconds_bucket", endpoint="<unmatched>", le="0.005") == 3 * restarts
    assert not [s for s in samples if s[0] == "model_info"], "a dead worker's model is not served"


def test_a_scrape_during_the_merge_of_dead_workers_counts_each_request_once(tmp_path):
    import subprocess
    import sys

    from prometheus_client.parser import text_string_to_metric_families as parse

    from service.observability import render_metrics
    from tests.support import ROOT, child_environment

    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    restarts = 400
    # A master process restarting workers and merging their files, scraped meanwhile from here.
    master = subprocess.Popen(
        [sys.executable, "-m", "tests.metrics_workers", str(metrics_dir), str(restarts)],
        cwd=ROOT, env=child_environment({"PROMETHEUS_MULTIPROC_DIR": metrics_dir}), stdout=subprocess.DEVNULL,
    )
    seen, errors = [], []
    try:
        while master.poll() is None:
            try:
                body, _ = render_metrics(str(metrics_dir))
            except OSError as exc:  # a dead worker's file gone between the listing and the reading
                errors.append(repr(exc))
                continue
            samples = [(s.name, s.labels, s.value) for family in parse(body.decode()) for s in family.samples]
            seen.append(total(samples, "http_requests_total", endpoint="<unmatched>", status="200"))
    finally:
        master.wait(timeout=300)
    assert master.returncode == 0
    assert not errors, errors[:3]
    assert len(seen) > 50, "too few scrapes to meet the merges"
    # Requests are only ever added: a scrape that counted a dead worker twice shows more than the next.
    assert all(later >= earlier for earlier, later in zip(seen, seen[1:])), [
        (earlier, later) for earlier, later in zip(seen, seen[1:]) if later < earlier
    ][:5]
    assert max(seen) <= 3 * restarts
