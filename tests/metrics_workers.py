"""Worker restarts, for real: fork ``count`` short-lived processes in turn, each counting requests
in its own prometheus_client multiprocess files, and handle each one's death as gunicorn's master
does (``hooks.child_exit``). Run with PROMETHEUS_MULTIPROC_DIR set: ``python -m tests.metrics_workers DIR COUNT``."""

import os
import sys


def main(directory, count):
    from service import observability

    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # a worker: a few requests, then gone
            labels = observability.request_labels(None, "GET", 200)
            for _ in range(3):
                observability.REQUESTS.labels(*labels).inc()
                observability.REQUEST_LATENCY.labels(*labels).observe(0.003)
            observability.record_model("run", "abc", "cpu")
            os._exit(0)
        os.waitpid(pid, 0)
        observability.mark_process_dead(pid, directory)
    print(os.getpid())  # the master's own files (unlabelled histograms) stay: it is alive


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
