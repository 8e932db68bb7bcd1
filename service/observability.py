"""Request ids and Prometheus metrics: what an operator sees of every request."""

import contextvars
import fcntl
import glob
import logging
import os
import re
import time
import uuid

from contextlib import contextmanager

from flask import g, has_request_context, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.mmap_dict import MmapedDict

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is kept only when it is short and plain, so it is safe in logs and headers.
_VALID_REQUEST_ID = re.compile(r"\A[A-Za-z0-9._:@/+=-]{1,128}\Z")  # \Z: no trailing newline

# Label values come from closed sets, so no request can add a time series: a client chooses the
# method and the path, and each new label value would be a new series in every worker's file.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER = "other"
UNMATCHED = "<unmatched>"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("http_requests_total", "HTTP requests served.", ["endpoint", "method", "status"])
REQUEST_LATENCY = Histogram(
    "http_request_duration_seconds", "Time to answer an HTTP request.", ["endpoint", "method", "status"],
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_LATENCY = Histogram(
    "model_inference_duration_seconds", "Time of one batched forward pass, by the engine that ran it.", ["engine"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "model_batch_size", "Images per batched forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
PREDICTIONS = Counter("model_predictions_total", "Predictions returned, by label.", ["label"])
ROLLOUTS = Counter(
    "model_rollouts_total", "Looks at the model source on reload, by result: swapped, refused, unchanged, failed.",
    ["result"],
)
MODEL_INFO = Gauge(
    "model_info", "The model this worker serves (value 1).", ["model_uuid", "sha256", "device", "engine"],
    multiprocess_mode="liveall",
)


# The id of the request the server is handling in this thread, bound by the server (gunicorn's
# pre_request hook) before the app sees the request, so that the server's own lines carry it too.
_bound_request_id = contextvars.ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Put the current request's id on every log record (``-`` outside a request)."""

    def filter(self, record):
        record.request_id = current_request_id()
        return True


def new_request_id(incoming=None):
    """Return the caller's id when it is short and plain, else a fresh one."""
    return incoming if incoming and _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex


def bind_request_id(incoming=None):
    """In the server, before the app runs: choose the id of the request starting now and return it."""
    request_id = new_request_id(incoming)
    _bound_request_id.set(request_id)
    return request_id


def unbind_request_id():
    """In the server, once the request is answered and logged."""
    _bound_request_id.set(None)


def current_request_id():
    """Return the id of the request being served (``-`` outside a request)."""
    if has_request_context() and "request_id" in g:
        return g.request_id
    return _bound_request_id.get() or "-"


def _start_request():
    request_globals = g._get_current_object()  # one look-up of the proxy, not one per use
    request_globals.request_id = _bound_request_id.get() or new_request_id(request.headers.get(REQUEST_ID_HEADER))
    request_globals.request_started = time.perf_counter()


def request_labels(url_rule, method, status_code):
    """The endpoint, method and status labels of a request, each from a closed set: the app's
    route templates or ``<unmatched>``, KNOWN_METHODS or ``other``, 100-599 or ``other``."""
    endpoint = url_rule.rule if url_rule is not None else UNMATCHED
    method = method if method in KNOWN_METHODS else OTHER
    status = str(status_code) if 100 <= status_code <= 599 else OTHER
    return endpoint, method, status


# Each metric's series by label values: metric.labels() validates and locks on every call. The
# label values come from closed sets (request_labels, the models' labels), so this stays small.
_labelled_series = {}


def _labelled(metric, *labels):
    """``metric.labels(*labels)``, looked up once per metric and label values."""
    key = (metric, labels)
    found = _labelled_series.get(key)
    if found is None:
        found = _labelled_series[key] = metric.labels(*labels)
    return found


def _finish_request(response):
    response.headers[REQUEST_ID_HEADER] = current_request_id()
    current = request._get_current_object()  # one look-up of the proxy, not one per use
    labels = request_labels(current.url_rule, current.method, response.status_code)
    started = g.get("request_started")
    if started is not None:
        _labelled(REQUEST_LATENCY, *labels).observe(time.perf_counter() - started)
    _labelled(REQUESTS, *labels).inc()
    return response


def init_app(app):
    """Tag every request with an id and count it."""
    app.before_request(_start_request)
    app.after_request(_finish_request)


def record_model(model_uuid, sha256, device, engine="torch"):
    """Publish the model-info gauge for this worker."""
    MODEL_INFO.labels(model_uuid or "", sha256, device, engine).set(1)


def record_rollout(result):
    """Count one rollout by its result (swapped, refused, unchanged, failed)."""
    ROLLOUTS.labels(result).inc()


# The file-name part that stands for a pid in the files holding the counts of dead workers.
DEAD_WORKERS = "dead"
_SUMMED_KINDS = ("counter", "histogram", "summary")
# Locked by a merge (exclusive) and by every scrape (shared); not a .db file, which scrapes read.
MERGE_LOCK = ".merge.lock"


@contextmanager
def merge_lock(multiprocess_dir, exclusive):
    """Hold the metrics directory's merge lock: a scrape never reads a dead worker's counts half
    folded into the totals (counted twice, or its file gone between listing and reading)."""
    fd = os.open(os.path.join(multiprocess_dir, MERGE_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the only descriptor of this open file releases the lock


def mark_process_dead(pid, multiprocess_dir):
    """Drop a dead worker's live gauges from the merged metrics, and fold its counters,
    histograms and summaries into one file per kind (multiprocess mode only).

    Each worker leaves a file per kind; gunicorn replaces workers every GUNICORN_MAX_REQUESTS
    requests, and every scrape reads every file: merged, the files stay as many as the live
    workers (plus one per kind), and so does the scrape's time.
    """
    if not multiprocess_dir:
        return
    with merge_lock(multiprocess_dir, exclusive=True):
        _fold(pid, multiprocess_dir)


def _fold(pid, multiprocess_dir):
    multiprocess.mark_process_dead(pid, multiprocess_dir)
    for kind in _SUMMED_KINDS:
        dead = os.path.join(multiprocess_dir, f"{kind}_{pid}.db")
        if not os.path.exists(dead):
            continue
        totals = MmapedDict(os.path.join(multiprocess_dir, f"{kind}_{DEAD_WORKERS}.db"))
        try:
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(dead):
                total, _ = totals.read_value(key)
                totals.write_value(key, total + value, timestamp)
        finally:
            totals.close()
        os.unlink(dead)


def record_predictions(labels, batch_size, seconds, engine="torch"):
    """Count one batched forward pass (run by ``engine``) and the labels it returned."""
    INFERENCE_LATENCY.labels(engine).observe(seconds)
    BATCH_SIZE.observe(batch_size)
    for label in labels:
        _labelled(PREDICTIONS, label).inc()


class _WorkerFiles:
    """prometheus_client's multiprocess collector, less the files a worker has just created: such a
    file is empty until the worker sizes it, and reading it then would fail the whole scrape."""

    def __init__(self, multiprocess_dir):
        self.multiprocess_dir = multiprocess_dir

    def collect(self):
        files = []
        for path in glob.glob(os.path.join(self.multiprocess_dir, "*.db")):
            try:
                if os.path.getsize(path):
                    files.append(path)
            except FileNotFoundError:
                pass
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)


def render_metrics(multiprocess_dir=None):
    """Return the exposition text and its content type, merged across workers when multiprocess."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        registry.register(_WorkerFiles(multiprocess_dir))
        with merge_lock(multiprocess_dir, exclusive=False):
            return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
