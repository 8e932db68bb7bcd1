"""Where a request's CPU time goes, in one process with one torch thread (no sockets, no gunicorn).

    .venv/bin/python -m bench.profile

Times, as WSGI calls in interleaved rounds (so that the machine's drift hits all alike), the
same one-image request through the bare-Flask floor and the bare Flask view running the model's
calls (bench/floors.py) and through the service's Flask app, next to the model's calls alone
(the no-HTTP limit's decode + preprocess + forward) and the forward pass: the service's own
layers are what its call costs over the bare view running the same model calls. Each is timed
with hot caches (back to back) and cold (after a pause, as a served worker waits between
requests). Then profiles the service's call with pyinstrument and shows its time by package, and
the functions that take the most time outside the model's work. Together with the CPU per
request that ``make bench`` measures under gunicorn, this splits a request into inference, the
framework, the service's own layers and the HTTP server.
"""

import argparse
import io
import logging
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from bench.run import digit_png, write_checkpoint

BOUNDARY = "bench-profile-boundary"


def multipart(png, images):
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image_file"; filename="digit-{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n"
        for i in range(images)
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def wsgi_caller(app, method, path, body=b"", content_type=None):
    """A function that sends one request through ``app`` as a WSGI server would, and checks the status."""
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path=path, method=method, data=body, content_type=content_type).get_environ()

    def call():
        env = {**environ, "wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True}
        statuses = []
        b"".join(app(env, lambda status, headers, exc_info=None: statuses.append(status)))
        assert statuses[0].startswith("200"), statuses

    return call


# A served worker waits between requests (for its socket): PAUSE_S is that wait, in "cold" rounds.
PAUSE_S = 0.002


def interleaved_cpu_ms(functions, rounds, calls, pause=None):
    """Median CPU milliseconds per call of each of ``functions`` (name -> callable), measured in
    ``rounds`` rounds of ``calls`` calls that take turns, after a warm-up.

    With ``pause`` (seconds), the process sleeps that long before each call, as a worker does
    between requests, and only the calls are timed: what a call costs once the caches have gone
    cold while the core idled (on a virtual machine, other guests run on it meanwhile).
    """
    for function in functions.values():
        for _ in range(max(20, calls // 5)):
            function()
    spent = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            total = 0.0
            for _ in range(calls):
                if pause:
                    time.sleep(pause)
                started = time.thread_time()
                function()
                total += time.thread_time() - started
            spent[name].append(total / calls * 1000)
    return {name: statistics.median(values) for name, values in spent.items()}


def package_of(frame):
    path = frame.file_path or ""
    if not path or path.startswith("<"):
        return None  # a built-in, or pyinstrument's "[self]" entry: counted with its caller
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/service/" in path or "/config/" in path:
        return "service (this project)"
    if "/bench/" in path:
        return "the profiling loop"
    return "python stdlib"


# The model's work inside a request (decode, preprocess, forward, top label): left out of the
# function ranking, which is about everything around it.
MODEL_WORK = {("prepare", "service/inference.py"), ("classify", "service/inference.py")}


def time_by_function(session):
    """Seconds of own time per function outside the model's work, and those seconds in all."""
    totals = defaultdict(float)

    def walk(frame, caller):
        path = frame.file_path or ""
        if any(frame.function == name and path.endswith(tail) for name, tail in MODEL_WORK):
            return
        key = caller  # built-ins and pyinstrument's "[self]" entries count for their caller
        if path and not path.startswith("<"):
            where = path.split("site-packages/", 1)[-1] if "site-packages/" in path else path.rsplit("/main/", 1)[-1]
            key = f"{frame.function} ({where}:{frame.line_no})"
        totals[key] += frame.total_self_time
        for child in frame.children:
            walk(child, key)

    walk(session.root_frame(), "(the profiling loop)")
    return totals, sum(totals.values())


def time_by_package(session):
    """Seconds of the profile spent in each package's own code (built-ins go to their caller)."""
    totals = defaultdict(float)

    def walk(frame, inherited):
        package = package_of(frame) or inherited
        totals[package] += frame.total_self_time
        for child in frame.children:
            walk(child, package)

    walk(session.root_frame(), "python stdlib")
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per round (divided by the images per call)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile-calls", type=int, default=2000, help="one-image calls under pyinstrument")
    parser.add_argument("--top", type=int, default=25, help="functions to list outside the model's work")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    from bench.floors import flask_floor, model_floor
    from service import create_app
    from service.registry import EXTENSION

    with TemporaryDirectory(prefix="prediction-profile-") as folder:
        model_path = write_checkpoint(Path(folder) / "models" / "profile" / "model" / "model.pt")
        app = create_app({"PRED_MODEL_PATH": str(model_path)})
        logging.getLogger().setLevel(logging.WARNING)
        classifier = app.extensions[EXTENSION].prepare_worker(threads=1).classifier
        png = digit_png()
        max_pixels = app.config["MAX_IMAGE_PIXELS"]

        os.environ["PRED_MODEL_PATH"] = str(model_path)  # the model floor's model
        rows = []
        for images, pause in ((1, None), (1, PAUSE_S), (16, None)):
            body, content_type = multipart(png, images), f"multipart/form-data; boundary={BOUNDARY}"
            forward_batch = torch.zeros((images, *classifier.input_spec.shape))
            measured = interleaved_cpu_ms(
                {
                    "forward": lambda: classifier.forward(forward_batch),
                    "model": lambda: classifier.classify(
                        [classifier.prepare(png, "d.png", max_pixels) for _ in range(images)]
                    ),
                    "flask": wsgi_caller(flask_floor, "POST", "/api/v1/model/predict", body, content_type),
                    "flask+model": wsgi_caller(model_floor, "POST", "/api/v1/model/predict", body, content_type),
                    "service": wsgi_caller(app, "POST", "/api/v1/model/predict", body, content_type),
                },
                args.rounds,
                max(4, args.calls // images),
                pause,
            )
            rows.append((images, pause, measured))
        live = interleaved_cpu_ms({"live": wsgi_caller(app, "GET", "/health/live")}, 3, args.calls)["live"]

        print(f"CPU time per request, one process, one torch thread (ms), the median of {args.rounds} "
              f"interleaved rounds; 'cold': after a {PAUSE_S * 1000:g} ms pause before each call, as a "
              "served worker waits between requests:\n")
        print("| Images | Caches | forward pass | the model's calls (the limit) | bare-Flask floor "
              "| bare Flask + model | the service | the service's own layers |")
        print("|---|---|---|---|---|---|---|---|")
        for images, pause, ms in rows:
            print(f"| {images} | {'cold' if pause else 'hot'} | {ms['forward']:.2f} | {ms['model']:.2f} "
                  f"| {ms['flask']:.2f} | {ms['flask+model']:.2f} | {ms['service']:.2f} "
                  f"| {ms['service'] - ms['flask+model']:.2f} |")
        print(f"\nGET /health/live through the Flask app: {live:.2f} ms")

        from pyinstrument import Profiler

        request = wsgi_caller(app, "POST", "/api/v1/model/predict", multipart(png, 1),
                              f"multipart/form-data; boundary={BOUNDARY}")
        profiler = Profiler(interval=0.0001)
        profiler.start()
        for _ in range(args.profile_calls):
            request()
        profiler.stop()
        totals = time_by_package(profiler.last_session)
        everything = sum(totals.values())
        print("\nA one-image request through the Flask app, by package (pyinstrument, own time):\n")
        print("| Package | Share |")
        print("|---|---|")
        for package, seconds in sorted(totals.items(), key=lambda item: -item[1]):
            if seconds / everything >= 0.005:
                print(f"| {package} | {seconds / everything:.1%} |")

        functions, outside = time_by_function(profiler.last_session)
        print(f"\nOutside the model's work ({outside / everything:.0%} of the request), the functions with the "
              "most own time:\n")
        print("| Function | Share of that time |")
        print("|---|---|")
        for function, seconds in sorted(functions.items(), key=lambda item: -item[1])[: args.top]:
            print(f"| {function} | {seconds / outside:.1%} |")


if __name__ == "__main__":
    main()
