"""A client that posts continuously from its own process: ``python -m tests.load_client URL IMAGE OUT STOP``.

Each of ``--clients`` threads posts the image file IMAGE ``--images`` times per request to ``URL``
until the file ``STOP`` exists (or ``--max-seconds`` pass), then one JSON line per answer goes to
``OUT``: the HTTP status (or the socket error), ``X-Model-Version`` and the confidences in the
answer. ``OUT`` with ``.started`` appended is created once the first answer is in.
"""

import argparse
import json
import threading
import time
from pathlib import Path

import requests


def _post_until_stopped(url, files, stop_file, deadline, results, started_file):
    session = requests.Session()
    while not stop_file.exists() and time.monotonic() < deadline:
        started = time.monotonic()
        try:
            response = session.post(url, files=files, timeout=30)
            confidences = [item["confidence"] for item in response.json()["data"]] if response.ok else []
            results.append({
                "status": response.status_code,
                "version": response.headers.get("X-Model-Version"),
                "confidences": confidences,
                "seconds": time.monotonic() - started,
            })
            started_file.touch()
        except (requests.RequestException, ValueError) as exc:
            results.append({"status": None, "error": f"{exc.__class__.__name__}: {exc}"})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("stop", type=Path)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args(argv)
    image = args.image.read_bytes()
    started_file = args.out.with_name(args.out.name + ".started")
    files = [("image_file", (f"digit-{i}.png", image, "image/png")) for i in range(args.images)]
    results, deadline = [], time.monotonic() + args.max_seconds
    threads = [
        threading.Thread(target=_post_until_stopped, args=(args.url, files, args.stop, deadline, results, started_file))
        for _ in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    args.out.write_text("".join(json.dumps(result) + "\n" for result in results))


if __name__ == "__main__":
    main()
