"""``make bench``: the service as deployed under wrk load, against its limit and its floors.

In one run, each on free loopback ports and driven by wrk (a second process) with
bench/predict.lua, the same multipart digit every time (a photo in the last part):

- the limit with no HTTP at all: the predict view's own decode + preprocess + forward calls, in
  as many processes as workers, one torch thread each;
- the three floors of bench/floors.py under gunicorn sync with as many workers: a bare WSGI
  callable, a bare Flask view parsing ``request.files`` (no model), and that view running the
  predict view's model calls;
- the service exactly as deployed (config/gunicorn.conf.py): one-image requests at concurrency
  1, 8 and 32, then 16-image requests;
- the service behind nginx with deploy/nginx.conf;
- photos (bench/photos.py): a 12 MP phone JPEG posted to the service serving torchvision's
  mobilenet_v3_small, then resnet18, with one worker and one torch thread, at concurrency 1 and 8,
  beside the naive in-process pipeline (full decode, ``weights.transforms()``, eager forward);
  then the decode margin's cost and accuracy on photos of 12, 48 and 2 MP. ``--photos-only`` runs
  this part alone.

Prints one table and the CPU split of a one-image request (gunicorn, Flask, the model's work
as served, the service's own layers), then the photos' tables, and writes them, with a plot, into
BENCHMARKS.md (between the markers; the rest of that file is left as it is).
"""

import argparse
import contextlib
import getpass
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil
import requests
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import engines, photos  # noqa: E402
from bench.floors import single_threaded_model  # noqa: E402
from config.settings import Settings, child_environment, server_from_env  # noqa: E402
from service.architectures import DigitCNN  # noqa: E402
from service.demo import GUNICORN, stop  # noqa: E402
from service.training import digit_image  # noqa: E402

LUA_SCRIPT = ROOT / "bench" / "predict.lua"
# (name, gunicorn app, label): the floors of bench/floors.py, cheapest first.
FLOORS = (
    ("wsgi", "bench.floors:wsgi_floor", "floor: bare WSGI callable, reads the body"),
    ("flask", "bench.floors:flask_floor", "floor: bare Flask view, request.files"),
    ("model", "bench.floors:model_floor", "floor: bare Flask view + the model's calls"),
)
NGINX_LABEL = "through nginx (deploy/nginx.conf), 1 image per request"
TORCH_LABEL = "INFERENCE_ENGINE=torch (eager PyTorch), 1 image per request"
PREDICT = "/api/v1/model/predict"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Between BEGIN and END, the photos' report follows this line: `--photos-only` rewrites it alone.
PHOTOS_MARK = "<!-- bench:photos -->"
GENERATED_NOTE = "<!-- Written by `make bench` (bench/run.py); edits here are replaced. -->"
# The photo runs: one worker with one torch thread, so the served latency is one request's own.
PHOTO_WORKERS = 1
PHOTO_ENV = {"TORCH_NUM_THREADS": 1}
# Workers' memory with each engine is read with as many workers as the digits run with, after a
# few photos: PSS divides what they share with the master between them.
MEMORY_WORKERS, MEMORY_PHOTOS = 2, 4
MEMORY_ENGINES = ("auto", "torch")
PHOTO_CONCURRENCY = (1, 8)
MB = 1024 * 1024

# Targets on the 2-core reference machine (see BENCHMARKS.md).
TARGET_RATIO_AT_8 = 0.5
TARGET_BATCH_GAIN = 1.5
TARGET_P50_AT_1_MS = 1.5
TARGET_OWN_LAYERS_MS = 0.3  # the service's CPU per request over the bare-Flask floor and the model's work
TARGET_WORKERS_PSS_MB = 600
# A target is judged only on runs during which other processes kept less than this many cores
# busy: the limit, the floors and the service run one after the other, and a ratio between runs
# measured under different outside load says nothing.
QUIET_CORES = 0.1


@dataclass
class Run:
    """One wrk run (or one no-HTTP limit measurement) and what was measured around it."""

    label: str
    images: int
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int | None = None
    socket_errors: int | None = None
    rss_mb: list[float] = field(default_factory=list)
    pss_mb: list[float] = field(default_factory=list)
    master_mb: tuple[float, float] | None = None
    cpu_ms: float | None = None  # CPU time per request (per call without HTTP), all our processes
    client_cpu_ms: float | None = None  # of which wrk's
    busy_elsewhere: float | None = None
    ratio: float | None = None

    @property
    def images_per_s(self):
        return self.requests_per_s * self.images


# --- inputs -----------------------------------------------------------------------------------


def write_checkpoint(path):
    """A checkpoint in the template's format: the served network, random weights (same compute)."""
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "model_state_dict": DigitCNN().state_dict()}, path)
    return path


def digit_png():
    """A real handwritten digit (scikit-learn's bundled set) as the 28x28 PNG a client sends."""
    from sklearn.datasets import load_digits

    buffer = io.BytesIO()
    digit_image(load_digits().images[0]).resize((28, 28), Image.Resampling.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the limit without HTTP -------------------------------------------------------------------


def _limit_process(model_path, png, images, seconds, barrier, results):
    """In a fresh process: what one single-threaded worker does per request, minus HTTP."""
    from bench.floors import single_threaded_model

    classifier, max_pixels = single_threaded_model(model_path)

    def once():  # the predict view's own calls: decode and preprocess each upload, one batched pass
        return classifier.classify([classifier.prepare(png, "digit.png", max_pixels) for _ in range(images)])

    warm_until = time.perf_counter() + 1.0
    while time.perf_counter() < warm_until:
        once()
    barrier.wait()
    latencies = []
    started, cpu_started = time.perf_counter(), time.process_time()
    while (now := time.perf_counter()) - started < seconds:
        once()
        latencies.append(time.perf_counter() - now)
    results.put((len(latencies), time.perf_counter() - started, time.process_time() - cpu_started, latencies))


def measure_limit(model_path, png, images, processes, seconds):
    """Calls per second of decode + preprocess + forward in ``processes`` parallel processes."""
    context = multiprocessing.get_context("spawn")  # no torch state inherited from this process
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_limit_process, args=(str(model_path), png, images, seconds, barrier, results))
        for _ in range(processes)
    ]
    busy, ours, wall = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    # Ctrl-C is for this process alone, which stops the workers: they start with SIGINT blocked (a
    # child inherits the mask), so none prints a KeyboardInterrupt traceback of its own.
    # A Ctrl-C that arrives while they start is raised once the mask is restored: the workers
    # started by then are stopped all the same.
    try:
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for worker in workers:
                worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        outcomes = [results.get(timeout=seconds + 120) for _ in workers]
    except BaseException:
        for worker in workers:
            if worker.pid is not None:
                worker.kill()
        raise
    finally:
        for worker in workers:
            if worker.pid is not None:
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()
    elsewhere = (busy_cpu_seconds() - busy) - (own_cpu_seconds() - ours)
    calls_per_s = sum(count / elapsed for count, elapsed, _, _ in outcomes)
    latencies = sorted(t for _, _, _, times in outcomes for t in times)
    cpu_per_call = sum(cpu for _, _, cpu, _ in outcomes) / sum(count for count, _, _, _ in outcomes)
    return Run(
        label=f"no HTTP (limit), {images} image{'s' if images > 1 else ''} per call",
        images=images,
        concurrency=processes,
        requests_per_s=calls_per_s,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        busy_elsewhere=max(0.0, elsewhere / (time.monotonic() - wall)),
        cpu_ms=cpu_per_call * 1000,
    )


def percentile(values, q):
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# --- the service under wrk --------------------------------------------------------------------


class Gunicorn:
    """gunicorn on a free loopback port; a context manager that always stops it.

    Without ``app``, the service exactly as deployed (config/gunicorn.conf.py, ``model_path``
    served); with ``app`` (``module:callable``), that app under gunicorn's defaults, sync
    workers, no access log: how the floors in bench/floors.py run (``model_path`` in
    PRED_MODEL_PATH, for the one that runs the model). ``env`` adds to the service's environment
    (TORCH_NUM_THREADS, say).
    """

    def __init__(self, log_path, workers, model_path=None, app=None, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if app is None:
            self.command = GUNICORN
            self.env = child_environment({
                "PRED_MODEL_PATH": model_path,
                "WEB_CONCURRENCY": workers,
                "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{self.port}",
                "PRED_MODEL_URI": None,
                "TORCH_NUM_THREADS": None,
                "API_KEY": None,
                "PROMETHEUS_MULTIPROC_DIR": None,
                **(env or {}),
            })
        else:
            self.command = [GUNICORN[0], "--workers", str(workers), "--worker-class", "sync",
                            "--bind", f"127.0.0.1:{self.port}", app]
            self.env = child_environment({"GUNICORN_CMD_ARGS": None, "WEB_CONCURRENCY": None,
                                          "PRED_MODEL_PATH": model_path})
        self.workers = workers
        self.process = None

    def __enter__(self):
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        # __exit__ does not run when __enter__ fails: stop gunicorn here, or it outlives the benchmark.
        try:
            self._wait_until_ready()
        except BaseException:
            stop(self.process, timeout=40)
            raise
        return self

    def _wait_until_ready(self):
        """Return once every worker answers readiness; raise SystemExit if gunicorn exits or takes over 120 s."""
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"gunicorn exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                ready = requests.get(self.url + "/health/ready", timeout=2).status_code == 200
            except requests.RequestException:
                ready = False
            if ready and len(self.worker_pids()) == self.workers:
                # Every worker answers readiness only once it has warmed up: ask until all have.
                if all(requests.get(self.url + "/health/ready", timeout=2).status_code == 200 for _ in range(8)):
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"gunicorn not ready after 120 s:\n{self.log_path.read_text()}")
            time.sleep(0.2)

    def __exit__(self, *exc):
        stop(self.process, timeout=40)

    def worker_pids(self):
        try:
            return [child.pid for child in psutil.Process(self.process.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self):
        return process_tree_cpu_seconds(self.process.pid)


NGINX_CONF = ROOT / "deploy" / "nginx.conf"


class Nginx:
    """nginx with deploy/nginx.conf in front of ``upstream`` (host:port), on a free loopback port.

    The site file is the deployed one with its two placeholders filled in, as the nginx image's
    envsubst does; pid, temporary files and logs stay in ``folder`` (the site's access lines, on
    stdout as in a container, in ``access_log``). One nginx worker: the machine's cores are for
    gunicorn's workers. ``log_level`` is the error log's; with ``check_config``, ``nginx -t``
    checks the configuration first. A context manager that always stops it.
    """

    def __init__(self, folder, upstream, log_level="warn", check_config=False):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        site = NGINX_CONF.read_text().replace("${API_UPSTREAM}", upstream)
        self.site = site.replace("${NGINX_PORT}", f"127.0.0.1:{self.port}")
        if "${" in self.site:
            raise SystemExit(f"{NGINX_CONF} has a placeholder this code does not fill in")
        self.log_level = log_level
        self.check_config = check_config
        self.access_log = folder / "access.log"
        self.process = None

    def _main_conf(self, site_path):
        temp = {name: self.folder / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir(parents=True, exist_ok=True)
        # As root, nginx would switch its workers to a user that cannot read the folder.
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
        return f"""{user}
worker_processes 1;
pid {self.folder}/nginx.pid;
error_log {self.folder}/error.log {self.log_level};
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {site_path};
}}
"""

    def __enter__(self):
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise SystemExit("nginx is not installed (Debian package nginx; .ci/run installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        site_path, conf = self.folder / "prediction.conf", self.folder / "nginx.conf"
        site_path.write_text(self.site)
        conf.write_text(self._main_conf(site_path))
        command = [binary, "-p", str(self.folder), "-e", str(self.folder / "error.log"), "-c", str(conf)]
        if self.check_config:
            checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
            if checked.returncode != 0:
                raise SystemExit(f"nginx -t refused the configuration:\n{checked.stderr}")
        with open(self.access_log, "wb") as log:  # the site logs to stdout
            self.process = subprocess.Popen(
                [*command, "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 15
            while True:
                if self.process.poll() is not None:
                    raise SystemExit(f"nginx exited with {self.process.returncode}:\n"
                                     f"{(self.folder / 'error.log').read_text()}")
                try:
                    requests.get(self.url + "/health/live", timeout=2)
                    return self
                except requests.ConnectionError:
                    if time.monotonic() > deadline:
                        raise SystemExit("nginx did not start listening in 15 s") from None
                    time.sleep(0.1)
        except BaseException:
            stop(self.process)
            raise

    def __exit__(self, *exc):
        stop(self.process)

    def cpu_seconds(self):
        return process_tree_cpu_seconds(self.process.pid)


def process_tree_cpu_seconds(pid):
    """CPU seconds (user + system) of a process and its children, as they are now, including the
    children it has already reaped: a worker recycled by GUNICORN_MAX_REQUESTS during a run
    leaves the tree, and its CPU moves into its master's children's times, not out of the sum."""
    total = 0.0
    try:
        parent = psutil.Process(pid)
        times = parent.cpu_times()
        total += times.user + times.system + times.children_user + times.children_system
        children = parent.children()
    except psutil.NoSuchProcess:
        return total
    for process in children:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def memory_mb(pid):
    """(RSS, PSS) of a process in MB, from /proc/<pid>/smaps_rollup (psutil where it is missing)."""
    try:
        values = {}
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[key] = int(rest.split()[0]) * 1024
        return values["Rss"] / MB, values["Pss"] / MB
    except (OSError, KeyError):
        info = psutil.Process(pid).memory_full_info()
        return info.rss / MB, info.pss / MB


def busy_cpu_seconds():
    """CPU seconds the whole machine has spent busy since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def own_cpu_seconds():
    """CPU seconds of this process and its waited-for children (wrk)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_wrk(url, connections, png_path, images, seconds, threads=None):
    """Run wrk with bench/predict.lua against ``url``; return the numbers its done() prints."""
    command = [
        shutil.which("wrk") or "wrk",
        f"-t{threads or min(connections, 2)}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout", "30s",
        "-s", str(LUA_SCRIPT),
        url,
        "--", str(png_path), str(images),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    for line in result.stdout.splitlines():
        if line.startswith("bench-result "):
            return json.loads(line.removeprefix("bench-result "))
    raise RuntimeError(f"wrk gave no result (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")


def measure_http(server, connections, png_path, images, seconds, label=None, front=None):
    """One wrk run against a running gunicorn (through ``front``, an Nginx, when given), with
    memory and outside load measured around it; CPU counts gunicorn, wrk and ``front``."""
    servers = [server] + ([front] if front else [])
    url = (front or server).url + PREDICT

    def server_cpu():
        return sum(s.cpu_seconds() for s in servers)

    busy, client, workers, wall = busy_cpu_seconds(), own_cpu_seconds(), server_cpu(), time.monotonic()
    stats = run_wrk(url, connections, png_path, images, seconds)
    client, workers = own_cpu_seconds() - client, server_cpu() - workers
    elsewhere = (busy_cpu_seconds() - busy) - client - workers
    memory = [memory_mb(pid) for pid in server.worker_pids()]
    master = memory_mb(server.process.pid)
    requests_per_s = stats["requests"] / (stats["duration_us"] / 1e6)
    return Run(
        label=label or f"HTTP, {images} image{'s' if images > 1 else ''} per request",
        images=images,
        concurrency=connections,
        requests_per_s=requests_per_s,
        p50_ms=stats["p50_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        non_2xx=stats["non_2xx"],
        socket_errors=stats["connect_errors"] + stats["read_errors"] + stats["write_errors"] + stats["timeouts"],
        rss_mb=[rss for rss, _ in memory],
        pss_mb=[pss for _, pss in memory],
        master_mb=master,
        busy_elsewhere=max(0.0, elsewhere / (time.monotonic() - wall)),
        cpu_ms=(workers + client) / max(1, stats["requests"]) * 1000,
        client_cpu_ms=client / max(1, stats["requests"]) * 1000,
    )


def measure_paired(servers, connections, png_path, seconds, rounds):
    """One-image wrk runs that take turns between ``servers`` (name -> a running Gunicorn),
    ``rounds`` rounds of ``seconds`` each, the order reversed every other round; return name -> runs.

    Two servers measured one after the other differ by whatever else changed between the runs
    (on a virtual machine, a third from one hour to the next); measured in turns, each round's
    difference is one of like with like, and the median of the differences holds still.
    """
    runs = {name: [] for name in servers}
    order = list(servers.items())
    for round_ in range(rounds):
        for name, server in order if round_ % 2 == 0 else order[::-1]:
            runs[name].append(measure_http(server, connections, png_path, 1, seconds, label=name))
    return runs


def paired_difference(first, second):
    """The median over rounds of ``second``'s CPU per request minus ``first``'s, both medians, and
    each round's difference."""
    differences = [b.cpu_ms - a.cpu_ms for a, b in zip(first, second)]
    return (statistics.median(differences), statistics.median(run.cpu_ms for run in first),
            statistics.median(run.cpu_ms for run in second), differences)


# --- phone photos -----------------------------------------------------------------------------


@dataclass
class PhotoResult:
    """One torchvision model's photo runs: the naive pipeline and the service's calls in this
    process (photos.Timing), the service under wrk (concurrency -> Run)."""

    model: photos.PhotoModel
    naive: photos.Timing
    naive_busy: float
    calls: photos.Timing
    calls_busy: float
    served: dict
    # INFERENCE_ENGINE -> (the workers' mean RSS, their mean PSS, the master's PSS) in MB
    memory: dict = field(default_factory=dict)

    @property
    def ratio(self):
        """Served p50 at concurrency 1 over the naive pipeline's p50."""
        return self.served[1].p50_ms / self.naive.p50_ms

    @property
    def busiest(self):
        return max([self.naive_busy, self.calls_busy, *(run.busy_elsewhere for run in self.served.values())])


def time_in_process(call, runs):
    """``photos.time_calls`` with the cores other processes kept busy meanwhile: (Timing, cores)."""
    busy, ours, wall = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    timing = photos.time_calls(call, runs)
    elsewhere = (busy_cpu_seconds() - busy) - (own_cpu_seconds() - ours)
    return timing, max(0.0, elsewhere / (time.monotonic() - wall))


def post_photo(url, photo_path):
    """One prediction request with the photo, as wrk sends it; raise SystemExit unless answered 200."""
    upload = {"image_file": (photo_path.name, photo_path.read_bytes(), "image/jpeg")}
    answer = requests.post(url + PREDICT, files=upload, timeout=60)
    if answer.status_code != 200:
        raise SystemExit(f"the service answered the photo with {answer.status_code}: {answer.text[:300]}")
    return answer.json()


def measure_photo_model(folder, model, photo_path, seconds, runs):
    """The naive pipeline (half its runs before the served ones, half after, so that drift in the
    machine's speed hits both alike), the service's calls without HTTP, and the service under wrk."""
    checkpoint = photos.write_checkpoint(folder / "models" / model.architecture / "model.pt", model)
    data = photo_path.read_bytes()
    with photos.torch_threads(1):
        naive = photos.NaivePipeline(checkpoint, model)
        print(f"photos, {model.architecture}: the naive pipeline and the service's calls in this process ...",
              flush=True)
        first, first_busy = time_in_process(lambda: naive(data), runs // 2 + runs % 2)
        classifier, max_pixels = single_threaded_model(checkpoint, Settings.INFERENCE_ENGINE)  # as served
        calls, calls_busy = time_in_process(
            lambda: classifier.classify([classifier.prepare(data, photo_path.name, max_pixels)]), runs)
        served = {}
        with Gunicorn(folder / f"photos-{model.architecture}.log", PHOTO_WORKERS, model_path=checkpoint,
                      env=PHOTO_ENV) as server:
            post_photo(server.url, photo_path)
            for connections in PHOTO_CONCURRENCY:
                print(f"wrk: {model.architecture}, the photo, {connections} connection(s) ...", flush=True)
                served[connections] = measure_http(server, connections, photo_path, 1, seconds,
                                                   label=f"served, {connections} connection(s)")
        second, second_busy = time_in_process(lambda: naive(data), runs // 2)
    memory = {engine: workers_memory(folder, model, checkpoint, photo_path, engine) for engine in MEMORY_ENGINES}
    return PhotoResult(model, first + second, max(first_busy, second_busy), calls, calls_busy, served, memory)


def workers_memory(folder, model, checkpoint, photo_path, engine):
    """(mean RSS, mean PSS, the master's PSS) in MB of the service's MEMORY_WORKERS workers serving
    ``model`` with INFERENCE_ENGINE ``engine``, once they have answered MEMORY_PHOTOS photos."""
    print(f"photos, {model.architecture}: workers' memory with INFERENCE_ENGINE={engine} ...", flush=True)
    with Gunicorn(folder / f"memory-{model.architecture}-{engine}.log", MEMORY_WORKERS, model_path=checkpoint,
                  env={**PHOTO_ENV, "INFERENCE_ENGINE": engine}) as server:
        for _ in range(MEMORY_PHOTOS):
            post_photo(server.url, photo_path)
        memory = [memory_mb(pid) for pid in server.worker_pids()]
        master = memory_mb(server.process.pid)
    return statistics.mean(rss for rss, _ in memory), statistics.mean(pss for _, pss in memory), master[1]


def memory_table(results):
    head = "| Model | Weights MB | INFERENCE_ENGINE | RSS/worker MB | PSS/worker MB | Master PSS MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for result in results:
        weights = photos.weights_mb(result.model)
        for engine, (rss, pss, master) in result.memory.items():
            lines.append(f"| {result.model.architecture} | {weights:.1f} | {engine} | {rss:.0f} | {pss:.0f} "
                         f"| {master:.0f} |")
    return "\n".join(lines)


def photo_table(results, runs):
    head = ("| Model | Pipeline | Concurrency | Images/s | p50 ms | p99 ms | Non-2xx | CPU ms/image "
            "| Busy elsewhere (cores) | p50 ÷ naive p50 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for result in results:
        name, naive = result.model.architecture, result.naive
        in_process = [
            (f"naive, in-process: full decode, weights.transforms(), eager forward ({runs} runs)", naive,
             result.naive_busy),
            (f"the service's calls, in-process: Classifier.prepare + classify ({runs} runs)", result.calls,
             result.calls_busy),
        ]
        for label, timing, busy in in_process:
            lines.append(
                f"| {name} | {label} | 1 | {fmt(1000 / statistics.mean(timing.wall_ms))} | {fmt(timing.p50_ms, 1)} "
                f"| – | – | {fmt(statistics.mean(timing.cpu_ms), 1)} | {fmt(busy, 2)} "
                f"| {fmt(timing.p50_ms / naive.p50_ms, 2)} |"
            )
        for connections, run in result.served.items():
            lines.append(
                f"| {name} | served: gunicorn as deployed, {PHOTO_WORKERS} worker, 1 torch thread, wrk | {connections} "
                f"| {fmt(run.images_per_s)} | {fmt(run.p50_ms, 1)} | {fmt(run.p99_ms, 1)} | {fmt(run.non_2xx, 0)} "
                f"| {fmt(run.cpu_ms, 1)} | {fmt(run.busy_elsewhere, 2)} | {fmt(run.p50_ms / naive.p50_ms, 2)} |"
            )
    return "\n".join(lines)


def photo_targets(results):
    """Each model's target, the served p50 at concurrency 1 over the naive p50, judged as the digits' are."""
    lines = ["| Target | Measured | Met |", "|---|---|---|"]
    all_met = True
    for result in results:
        one = result.served[1]
        errors = sum(run.non_2xx + run.socket_errors for run in result.served.values())
        name = (f"{result.model.architecture}: served p50 at concurrency 1 ≤ {result.model.target} × the naive "
                "pipeline's p50, no errors")
        cpu_ratio = one.cpu_ms / statistics.mean(result.naive.cpu_ms)
        value = (f"{result.ratio:.2f} × ({one.p50_ms:.1f} of {result.naive.p50_ms:.1f} ms; in CPU per image "
                 f"{cpu_ratio:.2f} ×), {errors} non-2xx or socket errors")
        if result.busiest > QUIET_CORES:
            verdict, ok = (f"not judged: up to {result.busiest:.2f} cores busy elsewhere during the runs "
                           f"(over {QUIET_CORES})", False)
        else:
            ok = result.ratio <= result.model.target and errors == 0
            verdict = "yes" if ok else "**no**"
        all_met = all_met and ok
        lines.append(f"| {name} | {value} | {verdict} |")
    return "\n".join(lines), all_met


def margin_table(rows):
    head = ("| Photo | JPEG MB | Margin | Decoded to | Decode + preprocess, CPU ms | × the full decode's "
            "| Mean abs diff | Max abs diff | Max probability diff | Same top class |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        decoded = f"{row.decoded[0]}x{row.decoded[1]}" + (f" (1/{row.scale})" if row.scale > 1 else "")
        if row.margin is None:
            lines.append(f"| {row.photo} | {row.megabytes:.2f} | whole (the reference: weights.transforms()) "
                         f"| {decoded} | {row.ms:.1f} | 1 | 0 | 0 "
                         f"| 0 (its top class: {row.top_probability:.4f}) | – |")
            continue
        lines.append(
            f"| {row.photo} | {row.megabytes:.2f} | {row.margin} (≥ {row.side}) | {decoded} | {row.ms:.1f} "
            f"| {row.ms / row.reference_ms:.2f} | {row.mean_diff:.4f} | {row.max_diff:.4f} "
            f"| {row.probability_diff:.5f} | {'yes' if row.same_top1 else '**no**'} |"
        )
    return "\n".join(lines)


def bench_photos(args):
    """The photo runs: each torchvision model naive, in-process and served, then the decode margin;
    print their tables and return (their report, whether their targets are met)."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="prediction-bench-photos-") as folder:
        folder = Path(folder)
        print("photos: making the phone photos ...", flush=True)
        photo = photos.phone_photo(*photos.SERVED_PHOTO)
        photo_path = folder / "photo.jpg"
        photo_path.write_bytes(photo)
        results = [measure_photo_model(folder, model, photo_path, args.duration, args.photo_runs)
                   for model in photos.PHOTO_MODELS]
    print("photos: the decode margin ...", flush=True)
    sizes = {size: photo if size == photos.SERVED_PHOTO else photos.phone_photo(*size) for size in photos.MARGIN_PHOTOS}
    named = {f"{w * h / 1e6:.0f} MP ({w}x{h})": data for (w, h), data in sizes.items()}
    with photos.torch_threads(1):
        rows, logit_std = photos.margin_study(named, runs=args.margin_runs)
    load_after = os.getloadavg()
    results_table = photo_table(results, args.photo_runs)
    verdicts, all_met = photo_targets(results)
    margins = margin_table(rows)
    memory = memory_table(results)
    print("\n" + results_table + "\n\n" + verdicts + "\n\n" + memory + "\n\n" + margins)
    width, height = photos.SERVED_PHOTO
    body = "\n\n".join([
        "## Photos",
        "\n".join([
            f"- Run: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {args.duration} s per wrk run, "
            f"{args.photo_runs} in-process runs per pipeline.",
            f"- The photo: {width}x{height} ({width * height / 1e6:.0f} MP) baseline JPEG, quality 90, 4:2:0, "
            f"{len(photo) / 1e6:.2f} MB: scikit-learn's china.jpg upscaled with grain and fine texture "
            "(bench/photos.py), posted as one multipart image_file per request.",
            f"- Models: torchvision builders with random weights (the same compute as trained ones), their weights "
            "enum naming the preprocessing and categories. Served by gunicorn with config/gunicorn.conf.py, "
            f"WEB_CONCURRENCY={PHOTO_WORKERS}, TORCH_NUM_THREADS=1; in-process runs with one torch thread too.",
            f"- Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
            f"after: {', '.join(f'{v:.2f}' for v in load_after)}.",
        ]),
        results_table,
        "p50 ÷ naive p50: the row's p50 over the naive pipeline's, the same model. The naive pipeline's runs "
        "are taken half before the served ones and half after. CPU ms/image: for the served rows, gunicorn's "
        "and wrk's CPU per request; in-process, this process's CPU per call.",
        "### Photo targets",
        verdicts,
        "### Photos: workers' memory with each engine",
        f"The service as deployed with {MEMORY_WORKERS} workers and one torch thread each, read from "
        f"/proc/<pid>/smaps_rollup once it has answered {MEMORY_PHOTOS} photos: eager PyTorch's workers share "
        "the master's weights; each ONNX Runtime worker holds its own session's copy, laid out for its kernels.",
        memory,
        "### Photos: the decode margin",
        "Each photo decoded as the service decodes it with each margin — libjpeg's smallest scale (1, 1/2, 1/4 "
        "or 1/8) that keeps the shorter side at least margin × 256 (ResNet18_Weights' resize), then reduced by "
        "a whole factor no further than that (the 48 MP photo's 1/16 at margin 1 is 1/8 and a 2 × 2 box) — and "
        f"preprocessed: its CPU time (the median of {args.margin_runs} rounds in which the margins and the full "
        "decode take turns; one thread), and how far it lands from the full decode through weights.transforms(): "
        "the 224x224 crop's pixels in [0, 1] before normalisation, and the probabilities of a resnet18 with "
        f"random weights whose last layer is scaled so that its logits spread {logit_std:.1f} (standard deviation "
        "across the 1000 classes) on these photos.",
        margins,
    ])
    return body, all_met


# --- report -----------------------------------------------------------------------------------


def fmt(value, digits=1):
    return "–" if value is None else f"{value:,.{digits}f}"


def table(runs):
    head = (
        "| Load | Concurrency | Requests/s | Images/s | p50 ms | p99 ms | Non-2xx | Socket errors "
        "| RSS/worker MB | PSS/worker MB | Ratio to limit | CPU ms/request (wrk's) | Busy elsewhere (cores) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        lines.append(
            f"| {run.label} | {run.concurrency} | {fmt(run.requests_per_s)} | {fmt(run.images_per_s)} "
            f"| {fmt(run.p50_ms, 2)} | {fmt(run.p99_ms, 2)} | {fmt(run.non_2xx, 0)} | {fmt(run.socket_errors, 0)} "
            f"| {fmt(statistics.mean(run.rss_mb)) if run.rss_mb else '–'} "
            f"| {fmt(statistics.mean(run.pss_mb)) if run.pss_mb else '–'} "
            f"| {fmt(run.ratio, 2)} "
            f"| {fmt(run.cpu_ms, 2)}{f' ({run.client_cpu_ms:.2f})' if run.client_cpu_ms is not None else ''} "
            f"| {fmt(run.busy_elsewhere, 2)} |"
        )
    return "\n".join(lines)


def split(paired, floors, nginx, limit, service):
    """The CPU of a one-image request at concurrency 8, part by part: rows of (part, ms, how).

    gunicorn and Flask come from the floors' runs; the model's work as served and the service's
    own layers from ``paired``, the model floor's and the service's runs taken in turns.
    """
    wsgi, flask = floors.get("wsgi"), floors.get("flask")
    if not (paired and wsgi and flask):
        return []
    own, model, total, each = paired_difference(paired["model"], paired["service"])
    rows = [
        ("gunicorn (sync worker), sockets and wrk", wsgi.cpu_ms, "the bare-WSGI floor"),
        ("Flask: request and response objects, routing, multipart parsing", flask.cpu_ms - wsgi.cpu_ms,
         "bare-Flask floor − bare-WSGI floor"),
        ("the model's work, served: decode, preprocess, forward pass, top label", model - flask.cpu_ms,
         f"bare Flask + model − bare-Flask floor (in the no-HTTP limit's tight loop: {limit.cpu_ms:.2f})"),
        ("the service's own layers: arguments and response schemas, request ids, metrics, access log, "
         "version header", own, f"service − bare Flask + model, the median of {len(each)} rounds taking turns "
         f"({min(each):.2f} to {max(each):.2f})"),
        ("total, the service direct", total, f"the service's median in those rounds "
         f"({service.cpu_ms:.2f} in its own run above)" if service else "the service's median in those rounds"),
    ]
    if nginx and service:
        rows.append(("nginx in front (deploy/nginx.conf)", nginx.cpu_ms - service.cpu_ms,
                     "through nginx − direct"))
    return rows


def split_table(rows):
    lines = ["| Part | CPU ms per request | From |", "|---|---|---|"]
    lines += [f"| {part} | {ms:.2f} | {how} |" for part, ms, how in rows]
    return "\n".join(lines)


def targets(http, limits, own_layers_ms=None, floor_runs=None):
    """Each target with its measured value and whether it is met."""
    one = {run.concurrency: run for run in http if run.images == 1}
    batch = {run.concurrency: run for run in http if run.images > 1}
    if not (1 in one and 8 in one and 8 in batch):
        return "(the targets are defined at concurrency 1 and 8: run with both)", False
    at8, batch8 = one[8], batch[8]
    peak = max(http, key=lambda run: sum(run.pss_mb))
    peak_pss = sum(peak.pss_mb)
    rows = [
        (
            f"1-image requests at concurrency 8 ≥ {TARGET_RATIO_AT_8} × the no-HTTP limit, no errors",
            f"{at8.ratio:.2f} × ({at8.images_per_s:,.0f} of {limits[1].images_per_s:,.0f} images/s), "
            f"{at8.non_2xx} non-2xx, {at8.socket_errors} socket errors",
            at8.ratio >= TARGET_RATIO_AT_8 and at8.non_2xx == 0 and at8.socket_errors == 0,
        ),
    ]
    if own_layers_ms is not None:
        rows.append((
            f"the service's own layers ≤ {TARGET_OWN_LAYERS_MS} ms of CPU per 1-image request "
            "(over the bare Flask view running the same model calls)",
            f"{own_layers_ms:.2f} ms",
            own_layers_ms <= TARGET_OWN_LAYERS_MS,
        ))
    rows += [
        (
            f"{batch8.images}-image requests ≥ {TARGET_BATCH_GAIN} × the 1-image images/s (concurrency 8)",
            f"{batch8.images_per_s / at8.images_per_s:.2f} × ({batch8.images_per_s:,.0f} vs {at8.images_per_s:,.0f})",
            batch8.images_per_s >= TARGET_BATCH_GAIN * at8.images_per_s,
        ),
        (
            f"p50 at concurrency 1 ≤ {TARGET_P50_AT_1_MS} ms",
            f"{one[1].p50_ms:.2f} ms",
            one[1].p50_ms <= TARGET_P50_AT_1_MS,
        ),
        (
            f"all workers together ≤ {TARGET_WORKERS_PSS_MB} MB PSS",
            f"{peak_pss:.0f} MB, highest after any run ({len(peak.pss_mb)} workers; the master adds "
            f"{peak.master_mb[1]:.0f} MB PSS, {peak.master_mb[0]:.0f} MB RSS)",
            peak_pss <= TARGET_WORKERS_PSS_MB,
        ),
    ]
    busiest = max((run.busy_elsewhere or 0.0) for run in [*http, *limits.values(), *(floor_runs or [])])
    lines = ["| Target | Measured | Met |", "|---|---|---|"]
    if busiest > QUIET_CORES:
        verdict = f"not judged: up to {busiest:.2f} cores busy elsewhere during the runs (over {QUIET_CORES})"
        lines += [f"| {name} | {value} | {verdict} |" for name, value, _ in rows]
        return "\n".join(lines), False
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows]
    return "\n".join(lines), all(ok for _, _, ok in rows)


def plot(http, limits, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for images, marker in sorted({(run.images, "o" if run.images == 1 else "s") for run in http}):
        runs = sorted((run for run in http if run.images == images), key=lambda run: run.concurrency)
        label = f"{images} image{'s' if images > 1 else ''}/request"
        line = left.plot([r.concurrency for r in runs], [r.images_per_s for r in runs], marker=marker, label=label)[0]
        left.axhline(limits[images].images_per_s, color=line.get_color(), linestyle="--", linewidth=1,
                     label=f"no-HTTP limit, {images} image{'s' if images > 1 else ''}/call")
        right.plot([r.concurrency for r in runs], [r.p99_ms for r in runs], marker=marker, label=label)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({run.concurrency for run in http}), labels=sorted({run.concurrency for run in http}))
        axis.set_xlabel("concurrent connections (wrk)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("images per second")
    left.set_title("Throughput")
    left.set_ylim(bottom=0)
    right.set_ylabel("p99 latency (ms)")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(ScalarFormatter())
    right.set_title("p99 latency")
    figure.suptitle("Prediction service, gunicorn with 2 sync workers, 2-core machine", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def conditions(load_before, load_after, workers, seconds, limit_seconds):
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0].strip()
    threads = server_from_env({"WEB_CONCURRENCY": str(workers)}).torch_threads  # as gunicorn.conf.py sets them
    return "\n".join([
        f"- Run: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {seconds} s per wrk run, "
        f"{limit_seconds} s per limit measurement.",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 1024**3:.0f} GiB, no GPU.",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__}, {wrk_version}.",
        f"- Service: gunicorn with config/gunicorn.conf.py, {workers} sync workers, "
        f"{threads} torch thread(s) each (the defaults), access log on; "
        "wrk on the same machine, so it competes with the workers for the cores.",
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}. 'Busy elsewhere' is the CPU used during a run by "
        "processes other than gunicorn, wrk and this script (other work on the machine), in cores.",
    ])


def write_report(path, body=None, photos_body=None):
    """Write the generated section of ``path``, between the markers: ``body`` (the digits' report),
    then ``photos_body`` (the photos'); either one left out is kept as the file has it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    has_markers = BEGIN in text and END in text
    kept_body, kept_photos = "", ""
    if has_markers:
        inside = text[text.index(BEGIN) + len(BEGIN): text.index(END)].replace(GENERATED_NOTE, "")
        kept_body, _, kept_photos = inside.partition(PHOTOS_MARK)
    body = (kept_body if body is None else body).strip()
    photos_body = (kept_photos if photos_body is None else photos_body).strip()
    body_text = body + (f"\n\n{PHOTOS_MARK}\n\n{photos_body}" if photos_body else "")
    generated = f"{BEGIN}\n{GENERATED_NOTE}\n\n{body_text}\n{END}"
    if has_markers:
        text = text[: text.index(BEGIN)] + generated + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + generated + "\n"
    path.write_text(text)


def bench_digits(args):
    """The digit runs: the limit, the floors, the service, nginx; print their tables and return
    (their report, whether all their targets are met)."""
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    side = [int(c) for c in args.side_concurrency.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="prediction-bench-") as folder:
        folder = Path(folder)
        model_path = write_checkpoint(folder / "models" / "bench" / "model" / "model.pt")
        png = digit_png()
        png_path = folder / "digit.png"
        png_path.write_bytes(png)

        limits = {}
        for images in (1, args.batch):
            print(f"limit without HTTP, {images} image(s) per call ...", flush=True)
            limits[images] = measure_limit(model_path, png, images, args.workers, args.limit_duration)

        floors, model_floor = {}, None
        with contextlib.ExitStack() as servers:
            for name, app, label in FLOORS:
                with contextlib.ExitStack() as this_floor:
                    floor = this_floor.enter_context(
                        Gunicorn(folder / f"{name}.log", args.workers, model_path=model_path, app=app)
                    )
                    for connections in side:
                        print(f"wrk: {label}, {connections} connection(s) ...", flush=True)
                        run = measure_http(floor, connections, png_path, 1, args.duration, label=label)
                        if name == "model":
                            run.ratio = run.images_per_s / limits[1].images_per_s
                        floors.setdefault(name, {})[connections] = run
                    if name == "model":  # kept up, to take turns with the service below
                        model_floor = floor
                        servers.enter_context(this_floor.pop_all())

            http, proxied = [], []
            server = servers.enter_context(Gunicorn(folder / "gunicorn.log", args.workers, model_path=model_path))
            for images in (1, args.batch):
                for connections in concurrencies:
                    print(f"wrk: {images} image(s) per request, {connections} connection(s) ...", flush=True)
                    run = measure_http(server, connections, png_path, images, args.duration)
                    run.ratio = run.images_per_s / limits[images].images_per_s
                    http.append(run)
            with Nginx(folder / "nginx", f"127.0.0.1:{server.port}") as nginx:
                for connections in side:
                    print(f"wrk: {NGINX_LABEL}, {connections} connection(s) ...", flush=True)
                    run = measure_http(server, connections, png_path, 1, args.duration, label=NGINX_LABEL,
                                       front=nginx)
                    run.ratio = run.images_per_s / limits[1].images_per_s
                    proxied.append(run)
            print(f"wrk: the model floor and the service taking turns, {args.pair_rounds} rounds ...", flush=True)
            paired = measure_paired({"model": model_floor, "service": server}, 8, png_path, args.pair_duration,
                                    args.pair_rounds)
        # The same service with eager PyTorch running the network: what the engine is worth as served.
        with Gunicorn(folder / "gunicorn-torch.log", args.workers, model_path=model_path,
                      env={"INFERENCE_ENGINE": "torch"}) as torch_server:
            for connections in side:
                print(f"wrk: {TORCH_LABEL}, {connections} connection(s) ...", flush=True)
                run = measure_http(torch_server, connections, png_path, 1, args.duration, label=TORCH_LABEL)
                run.ratio = run.images_per_s / limits[1].images_per_s
                proxied.append(run)
        print("the engines side by side, in this process ...", flush=True)
        engine_pairs, peak_gflops = engines.measure(model_path, png)
    load_after = os.getloadavg()

    floor_runs = [run for by_concurrency in floors.values() for run in by_concurrency.values()]
    results = table([limits[1], limits[args.batch], *floor_runs, *http, *proxied])
    at8 = next((run for run in http if run.images == 1 and run.concurrency == 8), None)
    parts = split(paired, {name: runs.get(8) for name, runs in floors.items()},
                  next((run for run in proxied if run.concurrency == 8), None), limits[1], at8)
    own = next((ms for part, ms, _ in parts if part.startswith("the service's own")), None)
    verdicts, all_met = targets(http, limits, own, [*floor_runs, *paired["model"], *paired["service"]])
    engine_lines, engines_met = engines.verdicts(engine_pairs, peak_gflops)
    verdicts = "\n".join([verdicts, *engine_lines])
    all_met = all_met and engines_met
    print("\n" + results + "\n\n" + split_table(parts) + "\n\n" + engines.table(engine_pairs, peak_gflops) + "\n\n" + verdicts)
    plot(http, limits, args.plot)
    body = "\n\n".join([
        "## Latest run",
        conditions(load_before, load_after, args.workers, args.duration, args.limit_duration),
        results,
        "Ratio to limit: images/s over the no-HTTP images/s for the same images per call. "
        "RSS and PSS: mean per worker, read from /proc/<pid>/smaps_rollup after the run "
        "(PSS divides the pages workers share with the master and each other). "
        "CPU ms/request: CPU time of gunicorn's processes (and nginx's, through nginx) and wrk per request "
        "answered (in brackets, wrk's part); for the limit, CPU time per call. With every process busy, "
        "throughput is about 2 cores ÷ this figure, so the ratio to the limit is about the limit's CPU per "
        "call ÷ this figure. The floors (bench/floors.py) run under gunicorn's defaults (sync, no access log): "
        "a bare WSGI callable and a bare Flask view parsing request.files, with no model, are what gunicorn "
        "and Flask with its multipart parser cost for the same request; the third is that bare Flask view "
        "running the predict view's model calls and nothing else, the least a Flask service serving this "
        "model can cost.",
        "### Where a one-image request's CPU goes (concurrency 8, this run)",
        split_table(parts) if parts else "(needs the floors and the service at concurrency 8)",
        f"![Throughput and p99 latency against concurrency]({args.plot.resolve().relative_to(args.output.resolve().parent)})",
        "### The engines (INFERENCE_ENGINE)",
        "The service rows above run with the default engine, `auto` (ONNX Runtime running the service's own "
        "export, checked against PyTorch); the no-HTTP limit is eager PyTorch. "
        f"The row \"{TORCH_LABEL}\" is the same service with eager PyTorch. Below, in this process with one thread (bench/engines.py): the forward pass "
        "alone and the model's calls for one digit, with each engine.",
        engines.table(engine_pairs, peak_gflops),
        "### Targets",
        verdicts,
    ])
    return body, all_met




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--limit-duration", type=int, default=5, help="seconds per no-HTTP measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--side-concurrency", default="8",
                        help="concurrencies of the floors and of the service through nginx (1-image requests)")
    parser.add_argument("--batch", type=int, default=16, help="images per request in the batch runs")
    parser.add_argument("--pair-rounds", type=int, default=6,
                        help="rounds taking turns between the model floor and the service, for the CPU split")
    parser.add_argument("--pair-duration", type=int, default=4, help="seconds per wrk run in those rounds")
    parser.add_argument("--photo-runs", type=int, default=15,
                        help="runs of the naive in-process photo pipeline (and of the service's calls) per model")
    parser.add_argument("--margin-runs", type=int, default=7,
                        help="rounds of timed decodes, each photo at each margin and whole, in the margin study")
    parser.add_argument("--photos-only", action="store_true",
                        help="run the photo section alone (its report replaces only the photos' part)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "throughput.png")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian package wrk; .ci/run installs it)")
    body, all_met = (None, True) if args.photos_only else bench_digits(args)
    photos_body, photos_met = bench_photos(args)
    write_report(args.output, body, photos_body)
    wrote = f"{args.output}" + ("" if args.photos_only else f" and {args.plot}")
    missed = "" if all_met and photos_met else " (targets missed or not judged: see BENCHMARKS.md)"
    print(f"\nwrote {wrote}{missed}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # The servers it started are stopped on the way out; the report is written only at the end.
        print("make bench: interrupted; nothing written", file=sys.stderr)
        sys.exit(130)
