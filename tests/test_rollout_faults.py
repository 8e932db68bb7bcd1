"""Rollouts that fail safely, on real gunicorn and a real ``mlflow server``, under load: a version
with no model, over the size limit or whose network raises an unexpected exception is refused once
and no worker restarts for it; an unreadable model file is refused on SIGHUP; a download cut off
and a tracking server that stops (before or during a download) are tried again later; a worker
killed before and after a rollout comes back; a master stopped while a worker boots exits at once;
an operator's SIGHUP while a version is fetched neither fetches it again nor swaps it twice."""

import json
import os
import re
import signal
import time

import psutil
import pytest
import requests
import torch
from mlflow import MlflowClient
from torch import nn

from service import demo, mlflow_store, verify
from service.formats import read_model_file
from tests import faulty_nets
from tests.support import (
    Hold,
    cutting_proxy,
    mlflow_server,
    run_gunicorn,
    wait_for_workers,
    wait_until_ready,
    write_network_checkpoint,
    write_template_checkpoint,
)
from tests.test_rollout import (
    ALIAS,
    MODEL,
    POLL_SECONDS,
    assert_every_answer_whole,
    continuous_load,
    log_version,
    rollouts,
    served_version,
    wait_for,
    wait_for_version,
)

pytestmark = pytest.mark.slow

FAULTY_NETS = faulty_nets.__name__  # a project module MODEL_CODE_MODULES allows in these tests
DIGITS = [str(digit) for digit in range(10)]


def worker_boots(server):
    """How many workers gunicorn has started so far."""
    return len(re.findall(r"Booting worker with pid", server.log()))


def register_run_without_a_model(client, tmp_path):
    """A registered version whose run logged no model (only notes): the alias can be moved to it."""
    experiment = client.get_experiment_by_name("rollout") or client.get_experiment(client.create_experiment("rollout"))
    run = client.create_run(experiment.experiment_id)
    notes = tmp_path / "notes.txt"
    notes.write_text("training crashed before the model was logged")
    client.log_artifact(run.info.run_id, str(notes))
    client.set_terminated(run.info.run_id)
    return str(client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version)


def alias_env(url, tmp_path, **extra):
    return {
        "MLFLOW_TRACKING_URI": url,
        "PRED_MODEL_URI": f"models:/{MODEL}@{ALIAS}",
        "PRED_MODEL_POLL_SECONDS": POLL_SECONDS,
        "MODELS_DIR": tmp_path / "models",
        **extra,
    }


@pytest.fixture
def tracking(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as url:
        client = MlflowClient(tracking_uri=url)
        client.create_registered_model(MODEL)
        yield url, client


def test_a_version_with_no_model_or_too_big_a_model_is_refused_once_and_restarts_no_worker(tracking, tmp_path):
    url, client = tracking
    v1 = log_version(client, write_template_checkpoint(tmp_path / "v1" / "model.pt", seed=11))
    empty = register_run_without_a_model(client, tmp_path)
    # A valid checkpoint with 12 MB of extra tensors: over the 8 MiB limit set below.
    big = log_version(client, write_template_checkpoint(tmp_path / "big" / "model.pt", seed=12, ballast=torch.zeros(3_000_000)))
    big_run = client.get_model_version(MODEL, big).run_id
    client.set_registered_model_alias(MODEL, ALIAS, v1)
    env = alias_env(url, tmp_path, MAX_MODEL_FILE_SIZE="8MiB")
    with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
        booted = worker_boots(server)

        client.set_registered_model_alias(MODEL, ALIAS, empty)
        server.wait_for(rf"rollout: refused {empty}, still serving {v1}: .*has no model/model.pt artifact")
        # Every worker, forked before the refusal, reports it: the version and why.
        rollout = wait_for(lambda: served_version(server)[1].get("rollout"), lambda r: r and r["version"] == empty, server)
        assert rollout["result"] == "refused" and "has no model/model.pt artifact" in rollout["reason"]
        time.sleep(POLL_SECONDS * 6)  # six more polls see the alias on the refused version

        client.set_registered_model_alias(MODEL, ALIAS, big)
        server.wait_for(rf"rollout: refused {big}, still serving {v1}: .*over the limit of 8388608")
        time.sleep(POLL_SECONDS * 6)

        assert worker_boots(server) == booted, server.log()  # no reload for a refused version
        assert served_version(server)[0] == v1
        assert requests.get(server.url + "/health/ready", timeout=10).status_code == 200
        assert rollouts(server, "refused") == 2 and rollouts(server, "failed") == 0
    log = server.log()
    assert len(re.findall(rf"rollout: refused {empty}", log)) == 1, log
    assert len(re.findall(rf"rollout: refused {big}", log)) == 1, log
    assert "Traceback" not in log, log
    assert not (tmp_path / "models" / big_run).exists(), "an oversize model is refused before it is downloaded"
    assert_every_answer_whole(load, allowed={v1})


def test_a_version_whose_download_is_cut_off_is_tried_again_later_then_served(tracking, tmp_path):
    url, client = tracking
    v1 = log_version(client, write_template_checkpoint(tmp_path / "v1" / "model.pt", seed=41))
    v2 = log_version(client, write_template_checkpoint(tmp_path / "v2" / "model.pt", seed=42))
    v2_run = client.get_model_version(MODEL, v2).run_id
    client.set_registered_model_alias(MODEL, ALIAS, v1)
    mlflow_store.fetch_model_uri(f"models:/{MODEL}@{ALIAS}", tmp_path / "models", url)  # v1 is on disk already
    # The service talks to the tracking server through a proxy that cuts the next two model transfers short.
    with cutting_proxy(url, "truncated", cuts=2) as proxy_url:
        env = alias_env(proxy_url, tmp_path)
        with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
            booted = worker_boots(server)
            client.set_registered_model_alias(MODEL, ALIAS, v2)
            server.wait_for(rf"cannot fetch or check {v2} for now, still serving {v1}: .*bytes after the download")
            assert worker_boots(server) == booted and served_version(server)[0] == v1
            assert wait_for(lambda: served_version(server)[1].get("rollout"), lambda r: r and r["version"] == v2,
                            server)["result"] == "failed"
            wait_for_version(server, v2, timeout=120)  # the third try gets it whole
            assert worker_boots(server) == booted + 2, server.log()  # one reload, once it was checked
            assert rollouts(server, "failed") == 2 and rollouts(server, "refused") == 0
    log = server.log()
    assert re.findall(r"looking again in (\d+) s", log)[:2] == ["2", "4"], log  # a growing delay
    assert "Traceback" not in log, log
    assert (tmp_path / "models" / v2_run / "model" / "model.pt").is_file()
    assert_every_answer_whole(load, allowed={v1, v2})


def test_a_stopped_tracking_server_is_waited_for_then_the_new_version_served(tmp_path):
    store = tmp_path / "mlflow"
    tracking_server = mlflow_server(store)
    url = tracking_server.__enter__()
    port = int(url.rsplit(":", 1)[1])
    try:
        client = MlflowClient(tracking_uri=url)
        client.create_registered_model(MODEL)
        v1 = log_version(client, write_template_checkpoint(tmp_path / "v1" / "model.pt", seed=21))
        v2 = log_version(client, write_template_checkpoint(tmp_path / "v2" / "model.pt", seed=22))
        client.set_registered_model_alias(MODEL, ALIAS, v1)
        with run_gunicorn(tmp_path, alias_env(url, tmp_path)) as server, continuous_load(server.url, tmp_path) as load:
            booted = worker_boots(server)
            tracking_server.__exit__(None, None, None)
            tracking_server = None
            # The alias moves while the server is down (straight in its store).
            MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}").set_registered_model_alias(MODEL, ALIAS, v2)
            server.wait_for(r"cannot look for a new model: .*cannot reach the MLflow tracking server")
            server.wait_for(r"looking again in \d+ s")
            time.sleep(POLL_SECONDS * 4)
            assert worker_boots(server) == booted, server.log()  # waiting costs no reload
            assert served_version(server)[0] == v1
            with mlflow_server(store, port=port):
                wait_for_version(server, v2, timeout=120)
                assert worker_boots(server) == booted + 2, server.log()  # one reload: two new workers
    finally:
        if tracking_server is not None:
            tracking_server.__exit__(None, None, None)
    assert "Traceback" not in server.log(), server.log()
    assert_every_answer_whole(load, allowed={v1, v2})


def test_workers_killed_before_and_after_a_rollout_come_back_without_the_tracking_server(tmp_path):
    tracking_server = mlflow_server(tmp_path / "mlflow")
    url = tracking_server.__enter__()
    try:
        client = MlflowClient(tracking_uri=url)
        client.create_registered_model(MODEL)
        versions = []
        for seed in (31, 32):
            path = write_template_checkpoint(tmp_path / f"v{seed}" / "model.pt", seed=seed)
            version = log_version(client, path)
            # What `flask model train` logs, measured here: the parity check has something to compare with.
            run_id = client.get_model_version(MODEL, version).run_id
            accuracy, _ = verify.measure(read_model_file(path).classifier)
            client.log_param(run_id, "split_seed", 0)
            client.log_param(run_id, "test_fraction", 0.2)
            client.log_metric(run_id, "test_accuracy", accuracy)
            versions.append(version)
        v1, v2 = versions
        client.set_registered_model_alias(MODEL, ALIAS, v1)
        env = alias_env(url, tmp_path, VERIFY_MODEL_ON_START="1")
        with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
            workers = wait_for_workers(server.process, 2)
            os.kill(min(workers), signal.SIGKILL)  # before any rollout: the server goes on
            workers = wait_for_workers(server.process, 2, exclude={min(workers)})
            wait_for_version(server, v1)

            client.set_registered_model_alias(MODEL, ALIAS, v2)
            wait_for_version(server, v2)
            tracking_server.__exit__(None, None, None)  # the tracking server stops
            tracking_server = None
            workers = wait_for_workers(server.process, 2)
            os.kill(min(workers), signal.SIGKILL)  # after the rollout, with no tracking server
            wait_for_workers(server.process, 2, exclude={min(workers)})
            wait_for_version(server, v2)  # the new worker serves: its check ran in the master
            for _ in range(10):
                assert requests.get(server.url + "/health/ready", timeout=10).status_code == 200
            log = server.log()
    finally:
        if tracking_server is not None:
            tracking_server.__exit__(None, None, None)
    assert log.count("parity check passed") == 2, log  # once per version, in the master only
    assert "Traceback" not in log and "error:" not in log, log
    # A killed sync worker loses at most the one request it was answering.
    lost = load.failures()
    assert len(lost) <= 2 and all(result["status"] is None for result in lost), lost
    assert {r["version"] for r in load.results if r["status"] == 200} == {v1, v2}


class SecondRunFails(nn.Module):
    """A network whose every copy runs once: the master's check passes, a worker forked after it fails."""

    def __init__(self):
        super().__init__()
        self.register_buffer("runs", torch.zeros(1))
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x):
        self.runs.add_(1)
        if bool(self.runs[0] > 1):
            raise RuntimeError("this copy of the network has run before")
        return torch.log_softmax(self.fc(x.flatten(1)), 1)


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.(script|save)` is deprecated:FutureWarning")
def test_a_version_whose_workers_fail_their_warm_up_is_rolled_back_to_the_one_before(tmp_path):
    """The master's check passes, every worker forked after it fails: after a few tries with a
    growing delay, the version is refused once and the one before serves again; the requests
    sent meanwhile wait in the listen queue and are answered."""
    path = write_template_checkpoint(tmp_path / "served" / "model.pt", seed=1)
    env = {"PRED_MODEL_PATH": path, "ALLOW_MODEL_PROGRAMS": "1"}
    with run_gunicorn(tmp_path, env) as server:
        first, _ = served_version(server)
        workers = wait_for_workers(server.process, 2)
        os.kill(min(workers), signal.SIGKILL)  # before the rollout: replaced, the server goes on
        wait_for_workers(server.process, 2, exclude={min(workers)})
        assert worker_boots(server) == 3, server.log()
        with continuous_load(server.url, tmp_path) as load:  # (a worker killed mid-request loses it)
            roll_out_a_version_its_workers_cannot_start(server, path, tmp_path)
            log = server.log()
        # Three boots before the rollout, two for the failing version and its tries, two back on the first.
        assert 3 + 2 + 2 <= worker_boots(server) <= 3 + 2 + 4 + 2, log
        for _ in range(10):
            assert requests.get(server.url + "/health/ready", timeout=10).status_code == 200
        version, data = served_version(server)
        assert version == first, data
        assert data["rollout"]["result"] == "swapped" and "cannot start" in data["rollout"]["reason"], data
    assert_every_answer_whole(load, allowed={first})
    assert "Traceback" not in log, log


def roll_out_a_version_its_workers_cannot_start(server, path, tmp_path):
    """Replace the served file with a network that passes in the master and fails in every worker;
    wait until the master went back to the version before and a worker of it is ready."""
    staged = tmp_path / "staged.pt"
    metadata = {"labels": DIGITS, "input_shape": [1, 28, 28]}
    torch.jit.save(torch.jit.script(SecondRunFails()), str(staged), _extra_files={"metadata.json": json.dumps(metadata)})
    os.replace(staged, path)
    os.kill(server.process.pid, signal.SIGHUP)  # checked in the master (its run passes), then workers fail
    server.wait_for(r"cannot start in the workers .* going back to", timeout=120)
    server.wait_for(r"rollout: now serving .* back from", timeout=60)
    wait_until_ready(server.url, server.process, server.log_path, timeout=120)
    time.sleep(3)
    log = server.log()
    assert server.process.poll() is None, log
    assert "exited with code 1" in log and "Worker failed to boot" not in log, log
    delays = [float(d) for d in re.findall(r"this worker exits in ([\d.]+) s", log)]
    assert delays[:2] == [0.5, 1], delays  # not a respawn as fast as the master can fork
    assert len(re.findall(r"going back to", log)) == 1, log  # refused once


def serving_flagged(net, tmp_path):
    """The environment that serves ``net`` (a faulty_nets.FirstRunWhenFlagged) from its project
    module, on PyTorch, so that its own forward pass runs in the workers, and its flag file: (env, flag)."""
    name = type(net).__name__
    path = write_network_checkpoint(tmp_path / "served" / "model.pt", net, architecture=f"{FAULTY_NETS}:{name}",
                                    labels=DIGITS, input_shape=[1, 28, 28])
    flag = tmp_path / "flag"
    env = {"PRED_MODEL_PATH": path, "MODEL_CODE_MODULES": FAULTY_NETS, net.FLAG_VARIABLE: flag, "INFERENCE_ENGINE": "torch"}
    return env, flag


def test_a_worker_respawned_before_any_rollout_that_fails_its_warm_up_is_started_again_and_the_server_stays(tmp_path):
    """No rollout has happened: a replacement worker that cannot warm up is not the first boot
    (which would stop the server) and has nothing to roll back to: it is started again, with a
    growing delay, while the other worker answers; once the fault is gone it comes back."""
    env, flag = serving_flagged(faulty_nets.FailsWhenFlagged(), tmp_path)
    with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
        version, _ = served_version(server)
        workers = wait_for_workers(server.process, 2)
        booted = worker_boots(server)
        flag.touch()  # from now on, a worker's warm-up fails
        os.kill(min(workers), signal.SIGKILL)
        server.wait_for(r"this worker exits in 2 s", timeout=120)
        log = server.log()
        assert server.process.poll() is None, log
        assert "Worker failed to boot" not in log and "going back to" not in log, log
        assert worker_boots(server) >= booted + 3, log
        flag.unlink()
        wait_for_workers(server.process, 2, exclude={min(workers)})
        server.wait_for(r"warm-up forward pass took", count=3, timeout=120)
        log = server.log()
    lost = [result for result in load.failures() if result["status"] is None]
    assert len(lost) <= 1, lost  # at most the request the killed worker held
    load.results = [result for result in load.results if result not in lost]
    assert_every_answer_whole(load, allowed={version})
    assert "Traceback" not in log, log


def test_an_unexpected_exception_from_a_source_is_logged_once_and_refuses_the_version(tracking, tmp_path):
    url, client = tracking
    v1 = log_version(client, write_template_checkpoint(tmp_path / "v1" / "model.pt", seed=51))
    # A whole checkpoint whose network, from an allowed project module, cannot be built: its builder
    # raises asyncio's CancelledError, which is a BaseException, not an Exception.
    metadata = {"architecture": f"{FAULTY_NETS}:cancelled", "labels": DIGITS, "input_shape": [1, 28, 28]}
    cancelled = log_version(client, write_template_checkpoint(tmp_path / "v2" / "model.pt", seed=52, metadata=metadata))
    v3 = log_version(client, write_template_checkpoint(tmp_path / "v3" / "model.pt", seed=53))
    client.set_registered_model_alias(MODEL, ALIAS, v1)
    env = alias_env(url, tmp_path, MODEL_CODE_MODULES=FAULTY_NETS)
    with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
        booted = worker_boots(server)

        client.set_registered_model_alias(MODEL, ALIAS, cancelled)
        server.wait_for(rf"rollout: refused {cancelled}, still serving {v1}: unexpected error: CancelledError")
        time.sleep(POLL_SECONDS * 6)  # six more polls see the alias on the refused version
        assert worker_boots(server) == booted, server.log()  # no reload for a refused version
        assert served_version(server)[0] == v1
        assert requests.get(server.url + "/health/ready", timeout=10).status_code == 200
        assert rollouts(server, "refused") == 1 and rollouts(server, "failed") == 0

        client.set_registered_model_alias(MODEL, ALIAS, v3)  # the watcher is still watching
        wait_for_version(server, v3)
        server.wait_for(r"Booting worker with pid", count=booted + 2)
        assert worker_boots(server) == booted + 2, server.log()  # one reload: two new workers
        log = server.log()
    assert len(re.findall(rf"rollout: refused {cancelled}", log)) == 1, log
    assert len(re.findall(rf"rollout: unexpected error while looking at {cancelled}", log)) == 1, log
    assert log.count("Traceback (most recent call last)") == 1 and "CancelledError: the builder's task was cancelled" in log
    assert_every_answer_whole(load, allowed={v1, v3})


@pytest.mark.parametrize("unreadable", ["mode 000", "a directory"])
def test_an_unreadable_model_file_is_refused_on_sighup_and_the_served_model_stays(tmp_path, unreadable):
    if unreadable == "mode 000" and os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode; the directory case makes it unreadable instead")
    path = write_template_checkpoint(tmp_path / "served" / "model.pt", seed=61)
    with run_gunicorn(tmp_path, {"PRED_MODEL_PATH": path}) as server, continuous_load(server.url, tmp_path) as load:
        v1 = served_version(server)[0]
        booted = worker_boots(server)
        if unreadable == "mode 000":
            path.chmod(0)
        else:  # the file moved aside and a directory in its place: no model file to read there
            os.replace(path, path.with_name("aside.pt"))
            path.mkdir()
        os.kill(server.process.pid, signal.SIGHUP)
        server.wait_for(rf"rollout: refused .*, still serving {v1}: PRED_MODEL_PATH: .*(Permission denied|is a directory)")
        server.wait_for(r"Booting worker with pid", count=booted + 2)  # gunicorn's reload: two new workers
        wait_for_version(server, v1)
        assert server.process.poll() is None, server.log()
        assert requests.get(server.url + "/health/ready", timeout=10).status_code == 200
        assert worker_boots(server) == booted + 2, server.log()  # no more
        assert rollouts(server, "refused") == 1

        # Readable again, with a new model: the operator's next SIGHUP serves it.
        if unreadable == "mode 000":
            path.chmod(0o644)
        else:
            path.rmdir()
        os.replace(write_template_checkpoint(tmp_path / "new.pt", seed=62), path)
        os.kill(server.process.pid, signal.SIGHUP)
        v2 = wait_for(lambda: served_version(server)[0], lambda version: version != v1, server)
        wait_for_version(server, v2)
        server.wait_for(r"Booting worker with pid", count=booted + 4)
        assert worker_boots(server) == booted + 4, server.log()
    log = server.log()
    assert len(re.findall(r"rollout: refused", log)) == 1 and "Traceback" not in log, log
    assert_every_answer_whole(load, allowed={v1, v2})


def test_a_tracking_server_stopped_during_a_download_is_waited_for_then_the_version_served(tmp_path):
    store = tmp_path / "mlflow"
    tracking_server = mlflow_server(store)
    url = tracking_server.__enter__()
    port = int(url.rsplit(":", 1)[1])
    try:
        client = MlflowClient(tracking_uri=url)
        client.create_registered_model(MODEL)
        v1 = log_version(client, write_template_checkpoint(tmp_path / "v1" / "model.pt", seed=71))
        # 16 MB: a transfer that takes a while, stopped halfway.
        big = write_template_checkpoint(tmp_path / "v2" / "model.pt", seed=72, ballast=torch.zeros(4_000_000))
        v2 = log_version(client, big)
        client.set_registered_model_alias(MODEL, ALIAS, v1)
        mlflow_store.fetch_model_uri(f"models:/{MODEL}@{ALIAS}", tmp_path / "models", url)  # v1 is on disk already
        hold = Hold()
        with cutting_proxy(url, "dropped", cuts=1, hold=hold) as proxy_url:
            # MLflow's client would look the run up again after the broken transfer, retrying with
            # its own backoff for minutes (7 tries by default) before the watcher's turn comes.
            env = alias_env(proxy_url, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES=0)
            with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
                booted = worker_boots(server)
                client.set_registered_model_alias(MODEL, ALIAS, v2)
                assert hold.reached.wait(60), server.log()  # half of v2's model.pt is on its way
                tracking_server.__exit__(None, None, None)  # the tracking server stops...
                tracking_server = None
                hold.release.set()  # ...and the transfer breaks off
                server.wait_for(rf"cannot fetch or check {v2} for now, still serving {v1}: .*downloading")
                server.wait_for(r"cannot look for a new model: .*cannot reach the MLflow tracking server")
                server.wait_for(r"looking again in \d+ s", count=2)
                assert worker_boots(server) == booted, server.log()  # waiting costs no reload
                assert served_version(server)[0] == v1
                assert requests.get(server.url + "/health/ready", timeout=10).status_code == 200
                with mlflow_server(store, port=port):
                    wait_for_version(server, v2, timeout=180)
                    server.wait_for(r"Booting worker with pid", count=booted + 2)
                    assert worker_boots(server) == booted + 2, server.log()  # one reload, once it was whole
                log = server.log()
    finally:
        if tracking_server is not None:
            tracking_server.__exit__(None, None, None)
    delays = [int(d) for d in re.findall(r"looking again in (\d+) s", log)]
    assert delays[:3] == [2, 4, 8], log  # a growing delay
    assert "Traceback" not in log, log
    assert not list((tmp_path / "models").glob(".*.partial")), "the broken download is cleaned up"
    assert_every_answer_whole(load, allowed={v1, v2})


def test_a_master_stopped_while_a_worker_boots_exits_at_once_with_everything_it_started(tmp_path):
    env, flag = serving_flagged(faulty_nets.SlowFirstRun(), tmp_path)
    with run_gunicorn(tmp_path, env) as server, continuous_load(server.url, tmp_path) as load:
        workers = wait_for_workers(server.process, 2)
        flag.touch()  # from now on, a worker's warm-up takes minutes
        os.kill(min(workers), signal.SIGKILL)
        server.wait_for(r"warming up slowly")  # its replacement is booting
        assert worker_boots(server) == 3, server.log()
        group = [process.pid for process in psutil.Process(server.process.pid).children()] + [server.process.pid]

        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)  # what systemd or docker stop sends: to the master only
        returncode = server.process.wait(timeout=60)
        seconds = time.monotonic() - started
        log = server.log()
        assert returncode == 0, log
        # Well within the graceful timeout (30 s): the booting worker does not finish its warm-up first.
        assert seconds < 10, (seconds, log)
        assert not demo._group_alive(server.process.pid) and not [p for p in group if psutil.pid_exists(p)], log
    assert worker_boots(server) == 3, log  # none started while stopping
    assert "Traceback" not in log, log
    answered = [result for result in load.results if result["status"] is not None]
    assert answered and all(result["status"] == 200 for result in answered), answered[:5]


def test_an_operators_sighup_while_a_version_is_fetched_neither_fetches_it_again_nor_swaps_it_twice(tracking, tmp_path):
    url, client = tracking
    v1 = log_version(client, write_template_checkpoint(tmp_path / "v1" / "model.pt", seed=81))
    v2 = log_version(client, write_template_checkpoint(tmp_path / "v2" / "model.pt", seed=82))
    v2_run = client.get_model_version(MODEL, v2).run_id
    client.set_registered_model_alias(MODEL, ALIAS, v1)
    mlflow_store.fetch_model_uri(f"models:/{MODEL}@{ALIAS}", tmp_path / "models", url)  # v1 is on disk already
    hold = Hold()
    with cutting_proxy(url, "held", cuts=1, hold=hold) as proxy_url:
        with run_gunicorn(tmp_path, alias_env(proxy_url, tmp_path)) as server, continuous_load(server.url, tmp_path) as load:
            booted = worker_boots(server)
            client.set_registered_model_alias(MODEL, ALIAS, v2)
            assert hold.reached.wait(60), server.log()  # the watcher is halfway through v2's download
            os.kill(server.process.pid, signal.SIGHUP)  # the operator's reload meanwhile
            server.wait_for(r"Booting worker with pid", count=booted + 2)  # gunicorn's reload, on v1
            assert served_version(server)[0] == v1
            hold.release.set()
            wait_for_version(server, v2)
            time.sleep(POLL_SECONDS * 4)
            assert worker_boots(server) == booted + 4, server.log()  # the operator's reload, then v2's: no third
            assert rollouts(server, "swapped") == 1
            log = server.log()
    assert len(re.findall(rf"downloading run {v2_run}", log)) == 1, log  # fetched once, by the watcher
    assert len(re.findall(rf"loaded \S*{v2_run}", log)) == 1, log  # read and checked once
    assert f"run {v2_run} is already downloaded" not in log, log  # never looked up again on the main loop
    assert len(re.findall(r"rollout: now serving", log)) == 1, log
    assert "Traceback" not in log, log
    assert_every_answer_whole(load, allowed={v1, v2})
