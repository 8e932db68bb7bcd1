"""The inference engine: ONNX Runtime runs the network the service built, with PyTorch's answers,
or the service says why not and serves with PyTorch (``auto``) or refuses (``onnxruntime``)."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import requests
import torch
from torchvision import models

from config.settings import ConfigError, from_env
from service import create_app, engines
from service.architectures import DigitCNN
from service.formats import read_model_file
from service.inference import Classifier
from service.preprocess import InputSpec
from tests import images
from tests.support import ROOT, flask, project_package, run_gunicorn, wait_for_workers, write_template_checkpoint
from tests.test_architectures import FAMILIES, LABELS, checkpoint

PREDICT = "/api/v1/model/predict"
AUTO = {"INFERENCE_ENGINE": "auto"}


def same_answers(classifier, batch_sizes):
    """Run ``classifier``'s export on ONNX Runtime beside eager PyTorch; return the largest difference."""
    onnx, checked = engines.export_checked(classifier, max(batch_sizes))
    runner = engines.OnnxRunner(onnx)
    generator = torch.Generator().manual_seed(1)
    worst = checked
    for size in batch_sizes:
        batch = torch.rand((size, *classifier.input_spec.shape), generator=generator)
        with torch.inference_mode():
            expected = torch.softmax(classifier.module(batch), dim=1)
        got = torch.softmax(runner(batch), dim=1)
        assert got.shape == expected.shape == (size, len(classifier.labels))
        worst = max(worst, float((got - expected).abs().max()))
    return worst


def test_the_digit_network_answers_as_eager_pytorch_at_every_batch_size():
    torch.manual_seed(0)
    classifier = Classifier(DigitCNN().eval(), tuple(str(i) for i in range(10)))
    assert same_answers(classifier, [1, 7, 64]) <= engines.TOLERANCE  # 64: MAX_FILES's default


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_torchvision_family_answers_as_eager_pytorch(name):
    torch.manual_seed(0)
    module = models.get_model(name, weights=None, num_classes=len(LABELS)).eval()
    module = module.to(memory_format=torch.channels_last)  # as the service builds it
    classifier = Classifier(module, tuple(LABELS), InputSpec(channels=3, height=224, width=224))
    assert same_answers(classifier, [1, 7, 8]) <= engines.TOLERANCE  # 8: a MAX_FILES of 8


def inference_count(metrics, engine):
    prefix = f'model_inference_duration_seconds_count{{engine="{engine}"}} '
    return next((float(line[len(prefix):]) for line in metrics.splitlines() if line.startswith(prefix)), 0.0)


def test_the_engine_serves_and_is_reported(tiny_checkpoint):
    client = create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint), "INFERENCE_ENGINE": "auto"}).test_client()
    version = client.get("/api/v1/model/version").get_json()["data"]
    assert version["engine"] == "onnxruntime"  # auto, on the CPU
    before = inference_count(client.get("/metrics").get_data(as_text=True), "onnxruntime")
    metadata = client.get(f"/v2/models/{version['architecture']}").get_json()
    assert metadata["platform"] == "onnxruntime_onnx"
    response = client.post(PREDICT, data={"image_file": (io.BytesIO(images.png(3)), "3.png")})
    assert response.status_code == 200
    assert inference_count(client.get("/metrics").get_data(as_text=True), "onnxruntime") == before + 1


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_the_template_digits_get_the_same_answers_on_either_engine(tiny_checkpoint, engine):
    """The template's checkpoint on fifty digits: the labels identical, the probabilities within float rounding."""
    uploads = [(io.BytesIO(images.digit_png(i)[0]), f"{i}.png") for i in range(50)]
    reference = create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint), "INFERENCE_ENGINE": "torch"})
    served = create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint), "INFERENCE_ENGINE": engine})
    assert served.extensions["model_registry"].get().classifier.engine == engine

    def answers(app):
        files = [(io.BytesIO(data.getvalue()), name) for data, name in uploads]
        response = app.test_client().post(PREDICT, data={"image_file": files}, query_string={"top_k": 10})
        assert response.status_code == 200, response.get_json()
        return response.get_json()["data"]

    expected, got = answers(reference), answers(served)
    assert [a["prediction"] for a in got] == [a["prediction"] for a in expected]
    for a, b in zip(got, expected):
        assert abs(a["confidence"] - b["confidence"]) <= engines.TOLERANCE
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]] or all(
            abs(x["probability"] - y["probability"]) <= engines.TOLERANCE for x, y in zip(a["top_k"], b["top_k"])
        )


def test_auto_is_the_default_torch_never_exports_and_an_unknown_engine_is_a_config_error(tiny_checkpoint, caplog):
    assert from_env({}).INFERENCE_ENGINE == "auto"
    assert create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint)}).extensions["model_registry"].engine == "auto"
    app = create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint), "INFERENCE_ENGINE": "torch"})
    assert app.extensions["model_registry"].get().onnx is None
    assert "exported to ONNX" not in caplog.text
    with pytest.raises(ConfigError, match="INFERENCE_ENGINE: expected one of auto, torch, onnxruntime, got 'tensorrt'"):
        from_env({"INFERENCE_ENGINE": "tensorrt"})
    assert from_env({"INFERENCE_ENGINE": "ONNXRuntime"}).INFERENCE_ENGINE == "onnxruntime"


# -- networks ONNX Runtime cannot run as PyTorch does ----------------------------------------------

ODD = textwrap.dedent(
    '''
    """A team's networks that ONNX cannot carry."""
    import torch
    from torch import nn


    class Cumulative(nn.Module):
        """An operator neither exporter has an ONNX form for."""

        def __init__(self, num_classes):
            super().__init__()
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.head(torch.cummax(x.flatten(1)[:, :8], dim=1).values)


    class Branching(nn.Module):
        """Control flow on the data: a trace keeps the branch its example took (a blank image)."""

        def __init__(self, num_classes):
            super().__init__()
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            features = x.flatten(1)[:, :8]
            if bool(features.abs().sum() == 0):
                return self.head(features)
            return self.head(features * 3 + 1)
    '''
)


@pytest.fixture
def odd_package(tmp_path, monkeypatch):
    with project_package(tmp_path, monkeypatch, "odd", ODD) as (name, _):
        yield name


@pytest.mark.parametrize("network, why", [
    ("Cumulative", "the network cannot be exported to ONNX"),
    ("Branching", "ONNX Runtime's probabilities differ from PyTorch's by"),
])
def test_a_network_onnx_cannot_carry_serves_on_pytorch_under_auto_and_is_refused_under_onnxruntime(
    tmp_path, odd_package, caplog, network, why
):
    import importlib

    torch.manual_seed(0)
    net = getattr(importlib.import_module(f"{odd_package}.nets"), network)(len(LABELS)).eval()
    path = checkpoint(tmp_path / "m.pt", net, architecture=f"{odd_package}.nets:{network}", labels=LABELS,
                      input_shape=[1, 28, 28])
    config = {"TESTING": True, "PRED_MODEL_PATH": str(path), "MODEL_CODE_MODULES": (odd_package,),
              "INFERENCE_ENGINE": "auto"}

    app = create_app(config)
    served = app.extensions["model_registry"].get()
    assert served.classifier.engine == "torch" and served.info["engine"] == "torch"
    fallback = [r.getMessage() for r in caplog.records if "not ONNX Runtime" in r.getMessage()]
    assert len(fallback) == 1 and why in fallback[0], fallback
    assert "\n" not in fallback[0]
    response = app.test_client().post(PREDICT, data={"image_file": (io.BytesIO(images.png(1)), "1.png")})
    assert response.status_code == 200  # PyTorch answers, as it did before there was an engine

    strict = create_app({**config, "INFERENCE_ENGINE": "onnxruntime"})
    answer = strict.test_client().get("/health/ready")
    assert answer.status_code == 503


def test_inspect_names_the_engine(tiny_checkpoint):
    engine = json.loads(flask("model", "inspect", str(tiny_checkpoint)).stdout)["engine"]  # auto: the default
    assert engine["engine"] == "onnxruntime" and engine["why"].startswith("same answers as PyTorch within")
    app = create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint), "INFERENCE_ENGINE": "torch"})
    result = app.test_cli_runner().invoke(args=["model", "inspect", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["engine"] == {"engine": "torch", "why": "INFERENCE_ENGINE=torch"}


# -- gunicorn: each worker its own session, through a rollout -----------------------------------

def test_two_workers_serve_on_onnx_runtime_through_a_rollout(tmp_path):
    model = write_template_checkpoint(tmp_path / "model.pt", seed=1)
    env = {"PRED_MODEL_PATH": model, "PRED_MODEL_POLL_SECONDS": 0, **AUTO}
    uploads = [("image_file", (f"{i}.png", images.png(i), "image/png")) for i in range(10)]

    def eager(path):
        classifier = read_model_file(path).classifier
        batch = torch.stack([classifier.prepare(images.png(i), f"{i}.png", 1 << 24) for i in range(10)])
        return classifier.forward(batch).numpy()

    def served(server):
        response = requests.post(f"{server.url}{PREDICT}", files=uploads, params={"top_k": 10}, timeout=60)
        assert response.status_code == 200, response.text
        rows = response.json()["data"]
        return np.array([[dict((t["label"], t["probability"]) for t in r["top_k"])[str(c)] for c in range(10)]
                         for r in rows])

    with run_gunicorn(tmp_path, env=env, workers=2) as server:
        workers = wait_for_workers(server.process, 2)
        for _ in range(6):  # both workers answer
            assert requests.get(f"{server.url}/api/v1/model/version", timeout=10).json()["data"]["engine"] == "onnxruntime"
            assert np.abs(served(server) - eager(model)).max() <= engines.TOLERANCE
        write_template_checkpoint(tmp_path / "next.pt", seed=2).replace(model)
        server.process.send_signal(signal.SIGHUP)
        now = wait_for_workers(server.process, 2, exclude=workers)
        assert not now & workers
        expected = eager(model)
        for _ in range(6):
            data = requests.get(f"{server.url}/api/v1/model/version", timeout=10).json()["data"]
            assert data["engine"] == "onnxruntime" and data["sha256"] == read_model_file(model).sha256
            assert np.abs(served(server) - expected).max() <= engines.TOLERANCE
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        log = server.log()
    assert [line for line in metrics.splitlines() if line.startswith("model_info{")
            and 'engine="onnxruntime"' in line and line.endswith(" 1.0")], metrics
    assert log.count("exported to ONNX and checked against PyTorch") == 2  # once per version, in the master
    assert "Traceback" not in log


NO_TELEMETRY_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from service import engines
    from service.architectures import DigitCNN

    engines.OnnxRunner(engines.export(DigitCNN().eval(), (1, 28, 28)))
    print(os.environ["ORT_DISABLE_TELEMETRY"], sorted(os.listdir(sys.argv[1])))
    """
)


def test_onnx_runtime_sends_no_telemetry_and_leaves_no_file(tmp_path):
    """ONNX Runtime's Linux builds collect usage telemetry and keep a session file (``.ses``) in
    TMPDIR unless ORT_DISABLE_TELEMETRY is set before they are imported: the service sets it."""
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    environment.pop("ORT_DISABLE_TELEMETRY", None)
    result = subprocess.run([sys.executable, "-c", NO_TELEMETRY_SCRIPT, str(tmp_path)], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    setting, files = result.stdout.split(" ", 1)
    assert setting == "1" and ".ses" not in files, result.stdout


WORKER_MEMORY_SCRIPT = textwrap.dedent(
    """
    import os, torch
    from torchvision import models
    from service import engines

    def private_mb():
        with open("/proc/self/smaps_rollup") as rollup:
            fields = dict(line.split()[:2] for line in rollup if line.split()[0].endswith(":"))
        return (int(fields["Private_Dirty:"]) + int(fields["Private_Clean:"])) / 1024

    torch.set_num_threads(1)
    network = models.get_model("resnet18", weights=None).eval().to(memory_format=torch.channels_last)
    onnx = engines.export(network, (3, 224, 224))
    engines.OnnxRunner(onnx, threads=1)  # as the master does when it checks the export
    read, write = os.pipe()
    if os.fork() == 0:  # a worker: it builds its own session from the master's export
        before = private_mb()
        runner = engines.OnnxRunner(onnx, threads=1)
        runner(torch.zeros((1, 3, 224, 224)))
        os.write(write, f"{private_mb() - before:.1f}".encode())
        os._exit(0)
    os.wait()
    weights = sum(p.numel() * p.element_size() for p in network.parameters()) / 2**20
    print(weights, os.read(read, 100).decode())
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="reads Linux's /proc")
def test_a_worker_building_its_session_keeps_little_more_than_the_weights_it_serves():
    """A worker's ONNX Runtime session passes through several transient copies of the weights;
    the service hands their freed pages back (glibc keeps them otherwise: 3.2 times resnet18's
    weights stayed in the worker, 1.2 times once handed back)."""
    result = subprocess.run([sys.executable, "-c", WORKER_MEMORY_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    weights, grown = map(float, result.stdout.split())
    assert grown < 2 * weights, f"the worker's session took {grown:.0f} MB for {weights:.0f} MB of weights"


def test_a_c_library_without_malloc_trim_builds_sessions_all_the_same(monkeypatch):
    """musl and macOS have no malloc_trim: the memory is then not handed back, and nothing else changes."""
    monkeypatch.setattr(engines, "_TRIM", None)
    engines.release_free_memory()
    classifier = Classifier(DigitCNN().eval(), tuple(LABELS))
    choice = engines.choose(classifier, "digit_cnn", engines.AUTO, max_batch=2)
    assert choice.engine == engines.ONNXRUNTIME
    assert engines.OnnxRunner(choice.onnx)(torch.zeros((1, 1, 28, 28))).shape == (1, 10)
