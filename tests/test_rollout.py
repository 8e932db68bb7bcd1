"""Rolling out a new model with no restart, under continuous load: an MLflow alias followed live,
a broken version refused, a rollback, SIGHUP, and a model file replaced in place."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from statistics import mean

import psutil
import pytest
import requests
from mlflow import MlflowClient

from tests import images
from tests.support import (
    ROOT,
    mlflow_server,
    run_gunicorn,
    wait_for_workers,
    write_template_checkpoint,
)

pytestmark = pytest.mark.slow

MODEL = "digits"
ALIAS = "champion"
POLL_SECONDS = 1
# How long a new version may take to serve everywhere once the alias moved: the poll interval, the
# fetch and checks in the master, and new workers booting, on a busy two-core machine.
ROLLOUT_SECONDS = POLL_SECONDS + 30
VERSION = "/api/v1/model/version"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-rollout")) as url:
        client = MlflowClient(tracking_uri=url)
        client.create_registered_model(MODEL)
        yield url, client


def log_version(client, model_file):
    """Log ``model_file`` as a run's ``model/model.pt`` and register it; return the version number."""
    experiment = client.get_experiment_by_name("rollout") or client.get_experiment(client.create_experiment("rollout"))
    run = client.create_run(experiment.experiment_id)
    client.log_artifact(run.info.run_id, str(model_file), "model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return str(version.version)


class Load:
    """What the continuous clients saw, once they have stopped."""

    results = ()

    def failures(self):
        return [r for r in self.results if r["status"] != 200]


@contextmanager
def continuous_load(url, tmp_path, clients=3):
    """Clients in another process post a four-digit batch continuously for as long as the block runs."""
    out, stop_file = tmp_path / f"load-{time.monotonic_ns()}.jsonl", tmp_path / f"stop-{time.monotonic_ns()}"
    errors, image = tmp_path / f"load-{time.monotonic_ns()}.log", tmp_path / "digit.png"
    image.write_bytes(images.png(0))
    with open(errors, "wb") as error_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.load_client", f"{url}/api/v1/model/predict", str(image), str(out),
             str(stop_file), "--clients", str(clients)],
            cwd=ROOT, stdout=error_file, stderr=subprocess.STDOUT,
        )
    load = Load()
    try:
        deadline = time.monotonic() + 60
        while not out.with_name(out.name + ".started").exists():  # the load is on before the test goes on
            assert process.poll() is None and time.monotonic() < deadline, errors.read_text()
            time.sleep(0.1)
        yield load
    finally:
        stop_file.touch()
        assert process.wait(timeout=60) == 0, errors.read_text()
        load.results = [json.loads(line) for line in out.read_text().splitlines()]


def served_version(server):
    response = requests.get(server.url + VERSION, timeout=10)
    assert response.status_code == 200, response.text
    return response.headers["X-Model-Version"], response.json()["data"]


def wait_for_version(server, version, timeout=ROLLOUT_SECONDS):
    """Wait until ten answers in a row come from ``version`` (every worker serves it); return the seconds."""
    started = time.monotonic()
    in_a_row = 0
    while in_a_row < 10:
        assert time.monotonic() - started < timeout, f"{version} not served after {timeout}s:\n{server.log()}"
        assert server.process.poll() is None, server.log()
        in_a_row = in_a_row + 1 if served_version(server)[0] == version else 0
        time.sleep(0.05 if in_a_row else 0.2)
    return time.monotonic() - started


def wait_for(ask, good, server, timeout=ROLLOUT_SECONDS):
    """Ask until the answer is good; return it."""
    deadline = time.monotonic() + timeout
    answer = ask()
    while not good(answer):
        assert time.monotonic() < deadline, f"last answer {answer}:\n{server.log()}"
        time.sleep(0.2)
        answer = ask()
    return answer


def rollouts(server, result):
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf'^model_rollouts_total{{result="{result}"}} (\S+)$', metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def assert_every_answer_whole(load, allowed):
    """No failure; each answer from an allowed version, and from one model only: a batch of the same
    digit gets one confidence, the one its version gives."""
    assert load.results, "the clients sent nothing"
    assert not load.failures(), load.failures()[:5]
    by_version = defaultdict(set)
    for result in load.results:
        assert result["version"] in allowed, result
        assert len(set(result["confidences"])) == 1, result  # one model for the whole batch
        by_version[result["version"]].add(round(result["confidences"][0], 6))
    assert all(len(confidences) == 1 for confidences in by_version.values()), dict(by_version)
    return by_version


def test_the_alias_is_followed_a_broken_version_refused_and_a_rollback_served(tracking, tmp_path):
    url, client = tracking
    v1 = log_version(client, write_template_checkpoint(tmp_path / "v1" / "model.pt", seed=1))
    v2 = log_version(client, write_template_checkpoint(tmp_path / "v2" / "model.pt", seed=2))
    broken = tmp_path / "v3" / "model.pt"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not a model" * 100)
    v3 = log_version(client, broken)
    client.set_registered_model_alias(MODEL, ALIAS, v1)
    env = {
        "MLFLOW_TRACKING_URI": url,
        "PRED_MODEL_URI": f"models:/{MODEL}@{ALIAS}",
        "PRED_MODEL_POLL_SECONDS": POLL_SECONDS,
        "MODELS_DIR": tmp_path / "models",
    }
    with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
        assert served_version(server)[0] == v1

        client.set_registered_model_alias(MODEL, ALIAS, v2)
        wait_for_version(server, v2)

        client.set_registered_model_alias(MODEL, ALIAS, v3)
        server.wait_for(rf"rollout: refused {v3}, still serving {v2}: .*cannot be served")
        # The workers forked after the refusal know of it.
        version, data = wait_for(lambda: served_version(server), lambda answer: "rollout" in answer[1]
                                 and answer[1]["rollout"]["result"] == "refused", server)
        assert version == v2 and data["model_version"] == v2
        assert data["rollout"]["version"] == v3
        assert "cannot be served" in data["rollout"]["reason"]
        assert requests.get(server.url + "/health/ready", timeout=10).status_code == 200
        time.sleep(POLL_SECONDS * 4)  # the alias still points at v3: it is not tried again
        assert len(re.findall(rf"rollout: refused {v3}", server.log())) == 1, server.log()

        client.set_registered_model_alias(MODEL, ALIAS, v1)  # the rollback
        wait_for_version(server, v1)
        assert served_version(server)[1]["rollout"]["result"] == "swapped"
        assert rollouts(server, "swapped") >= 2 and rollouts(server, "refused") == 1

    answered = assert_every_answer_whole(load, allowed={v1, v2})
    assert set(answered) == {v1, v2}, "the clients saw the rollout and the rollback"
    assert answered[v1] != answered[v2], "two different models answered"


def test_sighup_looks_at_once_and_polling_can_be_off(tracking, tmp_path):
    url, client = tracking
    first = log_version(client, write_template_checkpoint(tmp_path / "a" / "model.pt", seed=5))
    second = log_version(client, write_template_checkpoint(tmp_path / "b" / "model.pt", seed=6))
    client.set_registered_model_alias(MODEL, ALIAS, first)
    env = {
        "MLFLOW_TRACKING_URI": url,
        "PRED_MODEL_URI": f"models:/{MODEL}@{ALIAS}",
        "PRED_MODEL_POLL_SECONDS": 0,
        "MODELS_DIR": tmp_path / "models",
    }
    with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path, clients=2) as load:
        client.set_registered_model_alias(MODEL, ALIAS, second)
        time.sleep(3)
        assert served_version(server)[0] == first  # no polling: nothing happens by itself
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for_version(server, second)
    assert_every_answer_whole(load, allowed={first, second})


def worker_pss(server):
    """The mean proportional set size of the master's workers, after each answered a few requests."""
    for _ in range(40):
        requests.get(server.url + VERSION, timeout=10)
    workers = wait_for_workers(server.process, 2)
    return mean(psutil.Process(pid).memory_full_info().pss for pid in workers)


def test_a_replaced_model_file_is_served_after_sighup_and_memory_stays_shared(tmp_path):
    path = write_template_checkpoint(tmp_path / "served" / "model.pt", seed=1)
    with run_gunicorn(tmp_path, {"PRED_MODEL_PATH": path}) as server, continuous_load(server.url, tmp_path) as load:
        before_version, before = served_version(server)
        assert before_version == f"sha256:{before['sha256'][:12]}"
        pss_before = worker_pss(server)

        os.kill(server.process.pid, signal.SIGHUP)  # nothing changed: the same model goes on
        server.wait_for(r"rollout: .* is still the model to serve")
        wait_for_version(server, before_version)

        versions = [before_version]
        for seed in (2, 3, 4):
            replacement = write_template_checkpoint(tmp_path / f"staged-{seed}.pt", seed=seed)
            os.replace(replacement, path)  # as an operator should: the file changes in one step
            os.kill(server.process.pid, signal.SIGHUP)
            new_version = f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
            wait_for_version(server, new_version)
            versions.append(new_version)
        pss_after = worker_pss(server)

    assert len(set(versions)) == 4
    assert_every_answer_whole(load, allowed=set(versions))
    # The workers still share the master's weights: what each one costs has not grown.
    assert pss_after <= pss_before * 1.10, (pss_before, pss_after)
