"""The service as deployed: real gunicorn with config/gunicorn.conf.py, real HTTP, and the flask CLI."""

import json
import os
import re
import shutil
import subprocess

import pytest
import requests
import torch

from service.architectures import DigitCNN
from service.images import decode_image
from service.formats import read_model
from tests import images
from tests.support import flask, BIN, ROOT, SERVICE_VARIABLES, run_gunicorn, write_template_checkpoint

pytestmark = pytest.mark.slow

# None removes a variable from the server's environment; run_gunicorn sets WEB_CONCURRENCY itself.
CLEAN = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
THREADS_LINE = re.compile(r"\[(\d+)\] service\.registry \[-\] serving on cpu: .*; (\d+) torch thread\(s\)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    with run_gunicorn(tmp_path_factory.mktemp("gunicorn"), env={**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint}) as running:
        yield running


@pytest.fixture(scope="module")
def in_process(tiny_checkpoint):
    """The same model, loaded in this process: what the server must answer."""
    classifier, _ = read_model(tiny_checkpoint.read_bytes())
    return classifier


def expected_for(classifier, parts, top_k=None):
    decoded = [decode_image(data, name, 10**8) for data, name in parts]
    return [
        {"image_filename": name, "prediction": p.label, "confidence": pytest.approx(p.confidence, rel=1e-4)}
        for (_, name), p in zip(parts, classifier.predict(decoded, top_k))
    ]


def post(server, parts, **params):
    files = [("image_file", (name, data, "image/png")) for data, name in parts]
    return requests.post(f"{server.url}/api/v1/model/predict", files=files, params=params, timeout=30)


def test_a_real_png_over_http_gets_the_in_process_prediction(server, in_process):
    parts = [(images.png(7), "seven.png")]
    response = post(server, parts)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["data"] == expected_for(in_process, parts)


def test_several_pngs_in_one_request(server, in_process):
    parts = [(images.png(i), f"digit-{i}.png") for i in (3, 1, 4, 1, 5)]
    response = post(server, parts)
    assert response.status_code == 200, response.text
    assert response.json()["data"] == expected_for(in_process, parts)


def test_the_template_curl_example_works(server, in_process, tmp_path):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    image = tmp_path / "digit.png"
    image.write_bytes(images.png(2))
    result = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{server.url}/api/v1/model/predict",
         "-H", "Content-Type: multipart/form-data", "-F", f"image_file=@{image}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"] == expected_for(in_process, [(images.png(2), "digit.png")])


def test_errors_over_http_are_json(server):
    response = post(server, [(images.text_as_png(), "notes.png")])
    assert response.status_code == 422
    assert response.json()["code"] == 422 and "notes.png" in response.json()["message"]


def test_version_and_probes_over_http(server, tiny_checkpoint):
    version = requests.get(f"{server.url}/api/v1/model/version", timeout=10).json()["data"]
    assert version["model_uuid"] == tiny_checkpoint.parts[-3]
    assert version["model_path"] == str(tiny_checkpoint)
    assert version["device"] == "cpu"
    assert requests.get(f"{server.url}/health/live", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{server.url}/health/ready", timeout=10).status_code == 200


def test_each_worker_sets_its_torch_threads_and_logs_access(server):
    post(server, [(images.png(0), "0.png")])
    log = server.wait_for(r'"POST /api/v1/model/predict HTTP/1\.1" 200 ')
    workers = dict(THREADS_LINE.findall(log))
    assert len(workers) == 2, log  # two workers (run_gunicorn's default), one line each
    expected = max(1, (os.cpu_count() or 1) // 2)
    assert set(workers.values()) == {str(expected)}, log
    assert re.search(r'"POST /api/v1/model/predict HTTP/1\.1" 200 ', log), "every request gets an access line"


def test_a_worker_with_several_torch_threads_serves(tmp_path, tiny_checkpoint, in_process):
    # The master must not leave OpenMP's thread team behind: a worker forked from it would hang
    # in its first multi-threaded forward pass (the warm-up) and never become ready.
    env = {**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint, "TORCH_NUM_THREADS": 2}
    with run_gunicorn(tmp_path, env=env, workers=1, timeout=45) as running:
        assert [threads for _, threads in THREADS_LINE.findall(running.log())] == ["2"]
        parts = [(images.png(i), f"{i}.png") for i in range(8)]
        response = post(running, parts)
        assert response.status_code == 200
        assert response.json()["data"] == expected_for(in_process, parts)


# -- start-up failures --------------------------------------------------------------------------


def failed_start(tmp_path, env):
    """Start gunicorn expecting it to stop by itself; return its exit status and output."""
    with run_gunicorn(tmp_path, env={**CLEAN, **env}, workers=1, ready=False) as running:
        try:
            status = running.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gunicorn kept running:\n{running.log()}")
        return status, running.log()


def assert_one_clear_line(status, log, *words):
    assert status != 0, log
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log
    for word in words:
        assert word in errors[0], log
    return errors[0]


def test_a_missing_model_file_stops_start_up(tmp_path):
    status, log = failed_start(tmp_path, {"PRED_MODEL_PATH": tmp_path / "missing.pt"})
    assert_one_clear_line(status, log, "PRED_MODEL_PATH", "missing.pt", "does not exist")


def test_no_model_configured_stops_start_up(tmp_path):
    # Set but empty, so that a developer's .env cannot fill them in.
    status, log = failed_start(tmp_path, {"PRED_MODEL_PATH": "", "PRED_MODEL_URI": ""})
    assert_one_clear_line(status, log, "PRED_MODEL_PATH", "not set")


def test_an_invalid_setting_stops_start_up(tmp_path, tiny_checkpoint):
    status, log = failed_start(tmp_path, {"PRED_MODEL_PATH": tiny_checkpoint, "MAX_FILES": "abc"})
    assert_one_clear_line(status, log, "MAX_FILES", "'abc'")


def test_a_garbage_model_file_stops_start_up(tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(os.urandom(2048))
    status, log = failed_start(tmp_path, {"PRED_MODEL_PATH": garbage})
    assert_one_clear_line(status, log, "PRED_MODEL_PATH", str(garbage), "not a model file")


def test_a_model_whose_metadata_does_not_fit_stops_start_up(tmp_path):
    path = write_template_checkpoint(tmp_path / "model.pt", metadata={"input_shape": [1, 32, 32]})
    status, log = failed_start(tmp_path, {"PRED_MODEL_PATH": path})
    assert_one_clear_line(status, log, "PRED_MODEL_PATH", "input_shape")


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.(script|save)` is deprecated:FutureWarning")
def test_a_model_that_fails_its_warm_up_stops_start_up(tmp_path):
    # TorchScript's metadata cannot be checked against the network until it runs: in the worker.
    path = tmp_path / "model.pt"
    metadata = {"labels": [str(d) for d in range(10)], "input_shape": [1, 32, 32]}
    torch.jit.save(torch.jit.script(DigitCNN()), str(path), _extra_files={"metadata.json": json.dumps(metadata)})
    status, log = failed_start(tmp_path, {"PRED_MODEL_PATH": path, "ALLOW_MODEL_PROGRAMS": "1"})
    assert_one_clear_line(status, log, "PRED_MODEL_PATH", "warm-up", "[1, 32, 32]")


# -- flask CLI ----------------------------------------------------------------------------------


def test_the_flask_cli_works_with_no_model_configured():
    result = flask("--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+model\s", result.stdout, re.MULTILINE), result.stdout
    model_help = flask("model", "--help")
    assert model_help.returncode == 0, model_help.stderr
    assert "inspect" in model_help.stdout


def test_flask_model_inspect_describes_a_model_file(tiny_checkpoint):
    result = flask("model", "inspect", str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["architecture"] == "digit_cnn"
    assert summary["labels"] == [str(d) for d in range(10)]
    assert summary["input_shape"] == [1, 28, 28]


def test_flask_model_inspect_refuses_a_bad_file_in_one_line(tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a model")
    result = flask("model", "inspect", str(garbage))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "not a model file" in result.stderr


@pytest.mark.parametrize("path", ["/dev/zero", "fifo"])
def test_flask_model_inspect_refuses_what_is_not_a_regular_file_at_once(tmp_path, path):
    if path == "fifo":
        path = tmp_path / "model.pt"
        os.mkfifo(path)  # reading it would wait for a writer for ever; /dev/zero never ends
    result = flask("model", "inspect", str(path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"Error: {path} is not a regular file (a FIFO, device or socket), "
                                                  "expected a model file"]
