"""MLflow's own model format: directories written by ``mlflow.pytorch.log_model`` / ``save_model``,
read without unpickling, and served from a real tracking server through both APIs."""

import json
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pytest
import requests
import torch
import tritonclient.http as triton
from mlflow.models import infer_signature

from service.architectures import DigitCNN
from service.formats import ModelFileError, read_model_file
from tests import images
from tests.support import SERVICE_VARIABLES, ROOT, digit_batch, mlflow_server, run_gunicorn

CLEAN = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}


def network(seed=0):
    torch.manual_seed(seed)
    return DigitCNN().eval()


def save(path, model, batch=4, **options):
    example = digit_batch(range(batch)).numpy()
    signature = infer_signature(example, model(torch.from_numpy(example)).detach().numpy())
    mlflow.pytorch.save_model(model, str(path), input_example=example, signature=signature, **options)
    return path


def expected(model, batch):
    with torch.no_grad():
        return torch.exp(model(batch))


@pytest.fixture(scope="module")
def model():
    return network()


@pytest.mark.parametrize("example_batch", [1, 4])
def test_an_architecture_named_in_the_metadata_loads_as_plain_weights(tmp_path, model, example_batch):
    path = save(tmp_path / "m", model, example_batch, metadata={"architecture": "digit_cnn"})
    served = read_model_file(path)  # no programs allowed
    assert served.metadata["architecture"] == "digit_cnn"
    assert served.classifier.labels == tuple(str(i) for i in range(10))  # from the output signature
    assert isinstance(served.classifier.module, DigitCNN)
    batch = digit_batch(range(7))
    torch.testing.assert_close(served.classifier.forward(batch), expected(model, batch), atol=1e-5, rtol=1e-4)


def test_labels_and_the_input_shape_come_from_the_metadata_and_signature(tmp_path, model):
    labels = list("abcdefghij")
    path = save(tmp_path / "m", model, metadata={"architecture": "digit_cnn", "labels": labels})
    served = read_model_file(path)
    assert served.classifier.labels == tuple(labels)
    assert served.classifier.input_spec.shape == (1, 28, 28)


@pytest.mark.parametrize("example_batch", [1, 4])
def test_a_plain_export_is_a_program_served_only_when_programs_are_allowed(tmp_path, model, example_batch):
    path = save(tmp_path / "m", model, example_batch)
    with pytest.raises(ModelFileError) as refused:
        read_model_file(path)
    message = str(refused.value)
    assert "\n" not in message and "ALLOW_MODEL_PROGRAMS=1" in message and "torch.export" in message
    served = read_model_file(path, allow_programs=True)
    batch = digit_batch(range(7))  # not the exported batch size: batches of any size still work
    torch.testing.assert_close(served.classifier.forward(batch), expected(model, batch), atol=1e-5, rtol=1e-4)
    assert served.classifier.labels == tuple(str(i) for i in range(10))


def test_a_pickled_module_is_refused_in_one_line_and_never_unpickled(tmp_path, model):
    path = tmp_path / "m"
    mlflow.pytorch.save_model(model, str(path), serialization_format="pickle")
    marker = tmp_path / "unpickled"
    # Whatever the pickle holds would run on load: make it leave a trace if it ever does.
    (path / "data" / "model.pth").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )
    for allow in (False, True):
        with pytest.raises(ModelFileError) as refused:
            read_model_file(path, allow_programs=allow)
        assert "\n" not in str(refused.value)
        assert "pickled nn.Module" in str(refused.value)
    assert not marker.exists()


def test_the_weights_of_an_export_are_checked_against_their_data(tmp_path, model):
    import zipfile

    path = save(tmp_path / "m", model, metadata={"architecture": "digit_cnn"})
    archive = path / "data" / "model.pt2"
    with zipfile.ZipFile(archive) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    config_name = next(name for name in members if name.endswith("model_weights_config.json"))
    config = json.loads(members[config_name])
    config["config"]["fc1.weight"]["tensor_meta"]["sizes"][0]["as_int"] = 100_000  # past its data
    members[config_name] = json.dumps(config).encode()
    with zipfile.ZipFile(archive, "w") as target:
        for name, data in members.items():
            target.writestr(name, data)
    with pytest.raises(ModelFileError, match="reaches past"):
        read_model_file(path)


def test_a_directory_sha256_follows_its_content(tmp_path, model):
    path = save(tmp_path / "m", model, metadata={"architecture": "digit_cnn"})
    first = read_model_file(path).sha256
    assert read_model_file(path).sha256 == first
    (path / "MLmodel").write_text((path / "MLmodel").read_text() + "\n")
    assert read_model_file(path).sha256 != first


def test_directories_that_are_not_mlflow_models_are_refused(tmp_path, model):
    with pytest.raises(ModelFileError, match="without an MLmodel"):
        read_model_file(tmp_path)
    path = save(tmp_path / "m", model, metadata={"architecture": "digit_cnn"})
    (path / "data" / "link").symlink_to("/etc/passwd")
    with pytest.raises(ModelFileError, match="symbolic link"):
        read_model_file(path)


# -- a user's plain mlflow.pytorch.log_model on a real tracking server, served by URI --------------

USER_SCRIPT = textwrap.dedent(
    '''
    """A user's own training code: the template's network, logged the normal MLflow way."""
    import json, sys
    import mlflow, numpy as np, torch
    from torch import nn
    from torch.nn import functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            x = F.relu(self.fc1(torch.flatten(self.dropout1(x), 1)))
            return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)

    batch_file, expected_file = sys.argv[1], sys.argv[2]
    torch.manual_seed(3)
    model = Net().eval()
    batch = np.load(batch_file)
    mlflow.set_experiment("user-digits")
    with mlflow.start_run():
        plain = mlflow.pytorch.log_model(
            model, name="model", input_example=batch[:4], registered_model_name="user-digits"
        )
        named = mlflow.pytorch.log_model(
            model, name="weights", input_example=batch[:4], metadata={"architecture": "digit_cnn"}
        )
    with torch.no_grad():
        np.save(expected_file, torch.exp(model(torch.from_numpy(batch))).numpy())
    print(json.dumps({"plain": plain.model_id, "named": named.model_id}))
    '''
)


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """A tracking server with two models a user logged: plain (registered as user-digits v1), and
    one naming its architecture in the metadata."""
    folder = tmp_path_factory.mktemp("user")
    np.save(folder / "batch.npy", digit_batch(range(16)).numpy())
    (folder / "train.py").write_text(USER_SCRIPT)
    with mlflow_server(folder / "mlflow") as url:
        result = subprocess.run(
            [sys.executable, str(folder / "train.py"), str(folder / "batch.npy"), str(folder / "expected.npy")],
            cwd=folder, env={"PATH": "/usr/bin:/bin", "HOME": str(folder), "MLFLOW_TRACKING_URI": url},
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        ids = json.loads(result.stdout.strip().splitlines()[-1])
        yield url, ids, np.load(folder / "batch.npy"), np.load(folder / "expected.npy")


def answers_both_apis(server, name, batch, probabilities):
    pngs = [images.png(i) for i in range(16)]
    files = [("image_file", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    response = requests.post(f"{server.url}/api/v1/model/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    multipart = response.json()["data"]
    with triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60) as client:
        tensor = triton.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch.astype(np.float32))
        result = client.infer(name, [tensor])
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-5)
        image = triton.InferInput("image", [16], "BYTES")
        image.set_data_from_numpy(np.array(pngs, dtype=np.object_))
        labels = client.infer(name, [image]).as_numpy("label")
    assert [label.decode() for label in labels] == [p["prediction"] for p in multipart]
    # 28x28 PNGs of the digits are the batch the user's script was given: the same predictions.
    assert [p["prediction"] for p in multipart] == [str(i) for i in probabilities.argmax(axis=1)]


@pytest.mark.slow
def test_a_registered_plain_log_model_serves_both_apis_as_a_trusted_program(user_models, tmp_path):
    url, _, batch, probabilities = user_models
    env = {**CLEAN, "MLFLOW_TRACKING_URI": url, "MODELS_DIR": tmp_path, "PRED_MODEL_URI": "models:/user-digits/1",
           "ALLOW_MODEL_PROGRAMS": "1"}
    with run_gunicorn(tmp_path, env=env, workers=1) as server:
        version = requests.get(f"{server.url}/api/v1/model/version", timeout=10).json()["data"]
        assert version["model_name"] == "user-digits" and version["model_version"] == "1"
        answers_both_apis(server, "user-digits", batch, probabilities)


@pytest.mark.slow
def test_a_plain_log_model_is_refused_without_programs(user_models, tmp_path):
    url, ids, _, _ = user_models
    env = {**CLEAN, "MLFLOW_TRACKING_URI": url, "MODELS_DIR": tmp_path, "PRED_MODEL_URI": f"models:/{ids['plain']}"}
    with run_gunicorn(tmp_path, env=env, workers=1, ready=False) as server:
        server.process.wait(timeout=120)
        assert server.process.returncode != 0
    assert "ALLOW_MODEL_PROGRAMS=1" in server.log()


@pytest.mark.slow
def test_a_logged_model_id_naming_its_architecture_serves_as_plain_weights(user_models, tmp_path):
    url, ids, batch, probabilities = user_models
    env = {**CLEAN, "MLFLOW_TRACKING_URI": url, "MODELS_DIR": tmp_path, "PRED_MODEL_URI": f"models:/{ids['named']}"}
    with run_gunicorn(tmp_path, env=env, workers=1) as server:
        version = requests.get(f"{server.url}/api/v1/model/version", timeout=10).json()["data"]
        assert version["architecture"] == "digit_cnn"
        answers_both_apis(server, "digit_cnn", batch, probabilities)
    assert (tmp_path / ids["named"] / "MLmodel").is_file()


@pytest.mark.slow
def test_training_logs_the_network_as_an_mlflow_model_the_service_serves(user_models, tmp_path):
    from mlflow import MlflowClient

    from service import mlflow_store
    from service.training import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TrainConfig, train_and_log

    url = user_models[0]
    tracking = mlflow_store.connect(url)
    logged = train_and_log(TrainConfig(epochs=1, train_limit=200), tracking, experiment="trained", progress=False)
    client = MlflowClient(url)
    assert client.get_experiment_by_name("trained").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert "model/model.pt" in [f.path for f in client.list_artifacts(logged.run_id, "model")]
    model = client.get_logged_model(logged.model_id)
    assert model.source_run_id == logged.run_id
    files = [f.path for f in client.list_logged_model_artifacts(logged.model_id)]
    assert {"MLmodel", "input_example.json"} <= set(files)
    fetched = mlflow_store.fetch_model_uri(f"models:/{logged.model_id}", tmp_path, tracking_uri=url)
    served = read_model_file(fetched.path)  # plain weights: no programs allowed
    assert served.metadata["architecture"] == "digit_cnn"
    assert "signature" in (fetched.path / "MLmodel").read_text()
    checkpoint = tmp_path / "checkpoint"
    mlflow_store.download_run(logged.run_id, checkpoint, tracking=tracking)
    batch = digit_batch(range(8))
    torch.testing.assert_close(
        served.classifier.forward(batch),
        read_model_file(checkpoint / logged.run_id / "model" / "model.pt").classifier.forward(batch),
    )


@pytest.mark.slow
def test_a_planted_link_in_place_of_a_logged_model_is_refused(user_models, tmp_path):
    from service.mlflow_store import FetchError, download_logged_model

    url, ids, _, _ = user_models
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "MLmodel").write_text("flavors: {}\n")
    models = tmp_path / "models"
    models.mkdir()
    (models / ids["named"]).symlink_to(outside)

    with pytest.raises(FetchError, match="leads outside"):
        download_logged_model(ids["named"], models, tracking_uri=url)
