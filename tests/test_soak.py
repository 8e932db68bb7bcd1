"""The soak behind ``make soak`` (not part of ``make test``): ten minutes of load on real gunicorn
and a real ``mlflow server``, the alias moved every 30 s among good and bad versions, workers
recycled every 200 requests. No request may fail; the metric files, the scrape time and the
master's memory must stay bounded. SOAK_SECONDS and SOAK_MOVE_SECONDS shorten it for a try."""

import json
import os
import time
from statistics import median

import psutil
import pytest
import requests
from mlflow import MlflowClient

from tests.support import mlflow_server, run_gunicorn, write_template_checkpoint
from tests.test_rollout import ALIAS, MODEL, assert_every_answer_whole, continuous_load, log_version, rollouts
from tests.test_rollout_faults import register_run_without_a_model, worker_boots

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("SOAK_SECONDS", 600))
MOVE_SECONDS = float(os.environ.get("SOAK_MOVE_SECONDS", 30))


def sample(server, metrics_dir):
    """Metric files, scrape time (s) and the master's resident memory (MiB), now."""
    started = time.perf_counter()
    assert requests.get(server.url + "/metrics", timeout=30).status_code == 200
    scrape = time.perf_counter() - started
    rss = psutil.Process(server.process.pid).memory_info().rss / 2**20
    return {"files": len(list(metrics_dir.glob("*.db"))), "scrape_s": scrape, "master_mib": rss}


def test_soak(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as url:
        client = MlflowClient(tracking_uri=url)
        client.create_registered_model(MODEL)
        good = [log_version(client, write_template_checkpoint(tmp_path / f"g{s}" / "model.pt", seed=s)) for s in (1, 2, 3)]
        broken = tmp_path / "broken" / "model.pt"
        broken.parent.mkdir()
        broken.write_bytes(b"not a model" * 1000)
        bad = [log_version(client, broken), register_run_without_a_model(client, tmp_path)]
        cycle = [good[0], bad[0], good[1], bad[1], good[2]]
        client.set_registered_model_alias(MODEL, ALIAS, good[0])
        metrics_dir = tmp_path / "metrics"
        env = {
            "MLFLOW_TRACKING_URI": url, "PRED_MODEL_URI": f"models:/{MODEL}@{ALIAS}", "PRED_MODEL_POLL_SECONDS": 2,
            "MODELS_DIR": tmp_path / "models", "GUNICORN_MAX_REQUESTS": 200, "GUNICORN_MAX_REQUESTS_JITTER": 20,
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        }
        samples, moves = [], 0
        with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
            started = time.monotonic()
            next_move = started + MOVE_SECONDS
            while time.monotonic() - started < SECONDS:
                if time.monotonic() >= next_move:
                    moves += 1
                    client.set_registered_model_alias(MODEL, ALIAS, cycle[moves % len(cycle)])
                    next_move += MOVE_SECONDS
                samples.append(sample(server, metrics_dir))
                time.sleep(5)
                assert server.process.poll() is None, server.log()
            boots = worker_boots(server)
            refused, swapped = rollouts(server, "refused"), rollouts(server, "swapped")
    third = max(1, len(samples) // 3)
    figures = {
        "seconds": SECONDS, "alias_moves": moves, "requests": len(load.results), "failed": len(load.failures()),
        "worker_boots": boots, "rollouts_swapped": swapped, "rollouts_refused": refused,
        "metric_files_max": max(s["files"] for s in samples),
        "metric_files_max_first_third": max(s["files"] for s in samples[:third]),
        "metric_files_max_last_third": max(s["files"] for s in samples[-third:]),
        "scrape_ms_median_first_third": 1000 * median(s["scrape_s"] for s in samples[:third]),
        "scrape_ms_median_last_third": 1000 * median(s["scrape_s"] for s in samples[-third:]),
        "master_mib_first": samples[0]["master_mib"], "master_mib_max": max(s["master_mib"] for s in samples),
        "master_mib_last": samples[-1]["master_mib"],
    }
    print("\nsoak:", json.dumps(figures, indent=2))
    assert_every_answer_whole(load, allowed=set(good))
    assert refused <= len(bad), "each bad version is refused once, however often the alias comes back to it"
    # Three files per live worker (four during a reload), two of the master's, one merged per kind:
    # never a set per worker that ever ran.
    assert figures["metric_files_max"] <= 20, figures
    assert figures["metric_files_max_last_third"] <= figures["metric_files_max_first_third"] + 3, figures
    assert figures["scrape_ms_median_last_third"] <= 3 * figures["scrape_ms_median_first_third"] + 20, figures
    # The master holds the served model and at most one candidate: it does not grow with each rollout.
    assert figures["master_mib_last"] <= figures["master_mib_first"] + 150, figures
