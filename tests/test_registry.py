"""The model registry: every model format it serves, the files it refuses, devices, provenance and rollouts."""

import asyncio
import hashlib
import io
import json
import logging
import os
import pickle
import threading
import time
from datetime import datetime

import pytest
import torch
from PIL import Image
from torch import nn

from config.settings import from_env
from service.architectures import DigitCNN
from service.images import decode_image
from service.preprocess import InputSpec
from service import formats
from service.devices import select_device
from service.formats import model_uuid_from_path
from service.registry import AliasWatcher, ModelLoadError, ModelRegistry, Outcome, State
from tests import images
from tests.conftest import RUN_ID
from tests.support import digit_batch, encode, template_probabilities, write_template_checkpoint

DIGITS = [str(d) for d in range(10)]

# The test models are written with TorchScript, deprecated upstream but a format users have.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.(script|save)` is deprecated:FutureWarning",
    r"ignore:Detected pickle protocol:UserWarning",
)


def classify(classifier, indices=(0, 1, 2)):
    decoded = [decode_image(images.png(i), f"{i}.png", 10**8) for i in indices]
    return classifier.predict(decoded, top_k=len(classifier.labels))


def probabilities_by_label(prediction, labels):
    ranked = dict(prediction.top_k)
    return torch.tensor([ranked[label] for label in labels])


def read_model(data):
    """Read a model file's bytes, programs (TorchScript) allowed: the test models include some."""
    return formats.read_model(data, allow_programs=True)


def registry_for(path, **settings):
    """A registry of its own for ``path``, as an app makes one (programs allowed)."""
    return ModelRegistry.from_config({"PRED_MODEL_PATH": str(path), "ALLOW_MODEL_PROGRAMS": True, **settings})


def load(path, **settings):
    """Load ``path`` through a registry of its own, as a serving process does."""
    served = registry_for(path, **settings)
    served.get()
    return served


class ColourNet(nn.Module):
    """Not the template's CNN: 3x32x32 RGB in, three labels out, one per dominant colour."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3) * 10)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def write_torchscript(path, metadata=None):
    scripted = torch.jit.script(ColourNet().train())  # saved in training mode: loading must switch it off
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"metadata.json": json.dumps(metadata)} if metadata is not None else {}
    torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


COLOUR_METADATA = {"labels": ["red", "green", "blue"], "input_shape": [3, 32, 32]}


# -- formats ------------------------------------------------------------------------------------


def test_the_templates_checkpoint_loads_and_predicts(tiny_checkpoint):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    assert {"epoch", "optimiser_state_dict", "train_loss", "test_loss"} <= checkpoint.keys()

    classifier, metadata = read_model(tiny_checkpoint.read_bytes())

    assert metadata["architecture"] == "digit_cnn"
    assert classifier.labels == tuple(DIGITS)
    assert classifier.input_spec == InputSpec(1, 28, 28, None, None)
    expected = template_probabilities(checkpoint["model_state_dict"], digit_batch())
    for prediction, row in zip(classify(classifier), expected):
        assert prediction.label == DIGITS[int(row.argmax())]
        assert prediction.confidence == pytest.approx(row.max().item(), rel=1e-5)
        assert torch.allclose(probabilities_by_label(prediction, DIGITS), row, atol=1e-6)


def test_a_bare_state_dict_loads_and_predicts(tmp_path):
    torch.manual_seed(3)
    state_dict = DigitCNN().state_dict()
    path = tmp_path / "state_dict.pt"
    torch.save(state_dict, path)

    classifier, metadata = read_model(path.read_bytes())

    assert metadata["architecture"] == "digit_cnn"
    assert classifier.labels == tuple(DIGITS)
    expected = template_probabilities(state_dict, digit_batch())
    for prediction, row in zip(classify(classifier), expected):
        assert prediction.label == DIGITS[int(row.argmax())]
        assert torch.allclose(probabilities_by_label(prediction, DIGITS), row, atol=1e-6)


@pytest.mark.parametrize(("colour", "label"), [((220, 30, 10), "red"), ((5, 200, 40), "green"), ((0, 10, 250), "blue")])
def test_a_torchscript_archive_of_another_architecture_loads_and_predicts(tmp_path, colour, label):
    path = write_torchscript(tmp_path / "colour.pt", COLOUR_METADATA)

    classifier, metadata = read_model(path.read_bytes())

    assert metadata["architecture"] == "torchscript:ColourNet"
    assert classifier.labels == ("red", "green", "blue")
    assert classifier.input_spec.shape == (3, 32, 32)
    photo = decode_image(encode(Image.new("RGB", (45, 30), colour), "JPEG"), "photo.jpg", 10**8)
    (prediction,) = classifier.predict([photo])
    assert prediction.label == label
    assert prediction.confidence > 0.9


def test_a_torchscript_archive_is_served_with_its_metadata(tmp_path):
    path = write_torchscript(tmp_path / "models" / "run42" / "model" / "model.pt", COLOUR_METADATA)
    served = load(path)
    assert served.info["architecture"] == "torchscript:ColourNet"
    assert served.info["labels"] == ["red", "green", "blue"]
    assert served.info["input_shape"] == [3, 32, 32]
    assert served.info["model_uuid"] == "run42"


def test_a_torchscript_archive_without_metadata_is_refused(tmp_path):
    path = write_torchscript(tmp_path / "bare.pt")
    with pytest.raises(ModelLoadError, match=r"PRED_MODEL_PATH: .*bare\.pt: .*no metadata\.json"):
        load(path)


def test_torchscript_metadata_must_give_labels_and_input_shape(tmp_path):
    path = write_torchscript(tmp_path / "half.pt", {"labels": ["red", "green", "blue"]})
    with pytest.raises(ModelLoadError, match="must give labels and input_shape"):
        load(path)


def test_torchscript_metadata_that_does_not_fit_the_network_stops_at_warm_up(tmp_path):
    metadata = {"labels": ["red", "green", "blue", "grey"], "input_shape": [3, 32, 32]}
    path = write_torchscript(tmp_path / "four.pt", metadata)
    served = registry_for(path)
    served.load()  # the archive itself is fine...
    with pytest.raises(ModelLoadError, match=r"PRED_MODEL_PATH: .*four\.pt: .*3 classes but the model has 4 labels"):
        served.get()  # ...but its first forward pass shows the metadata is wrong
    assert not served.ready and served.state is State.FAILED
    assert "warm-up forward pass" in served.problem  # what /health/ready says


def test_a_checkpoint_with_its_own_metadata_loads_and_normalises(tmp_path):
    labels = ["cat", "dog", "bird"]
    metadata = {
        "architecture": "digit_cnn",
        "input_shape": [1, 28, 28],
        "normalize": {"mean": [0.1307], "std": [0.3081]},
        "labels": labels,
    }
    torch.manual_seed(5)
    state_dict = DigitCNN(num_classes=3).state_dict()
    path = tmp_path / "trained.pt"
    torch.save({"model_state_dict": state_dict, "metadata": metadata, "epoch": 3}, path)

    classifier, loaded = read_model(path.read_bytes())

    assert loaded["architecture"] == "digit_cnn"
    assert classifier.labels == tuple(labels)
    assert classifier.input_spec == InputSpec(1, 28, 28, (0.1307,), (0.3081,))
    batch = digit_batch()
    normalised = template_probabilities(state_dict, (batch - 0.1307) / 0.3081, num_classes=3)
    unnormalised = template_probabilities(state_dict, batch, num_classes=3)
    assert not torch.allclose(normalised, unnormalised, atol=1e-3), "normalisation must make a difference here"
    for prediction, row in zip(classify(classifier), normalised):
        assert prediction.label == labels[int(row.argmax())]
        assert torch.allclose(probabilities_by_label(prediction, labels), row, atol=1e-5)


@pytest.mark.parametrize("build", ["checkpoint", "torchscript"])
def test_models_run_in_eval_mode(tmp_path, build):
    if build == "checkpoint":
        path = write_template_checkpoint(tmp_path / "model.pt", seed=1)
        batch = digit_batch((0,))
    else:
        path = write_torchscript(tmp_path / "model.pt", COLOUR_METADATA)
        batch = torch.rand(1, 3, 32, 32)
    classifier, _ = read_model(path.read_bytes())

    assert not any(module.training for module in classifier.module.modules())
    first, second = classifier.forward(batch), classifier.forward(batch)
    assert torch.equal(first, second)

    # The same network in training mode gives a different answer each time: Dropout is live in it,
    # so the equality above shows eval() switched it off.
    classifier.module.train()
    with torch.no_grad():
        assert not torch.equal(classifier.module(batch), classifier.module(batch))


# -- files that are refused ---------------------------------------------------------------------


def refused(path):
    with pytest.raises(ModelLoadError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith("PRED_MODEL_PATH: "), message
    assert "\n" not in message
    return message


def test_a_missing_file_is_refused(tmp_path):
    assert "does not exist" in refused(tmp_path / "missing.pt")


def test_a_directory_is_refused(tmp_path):
    assert "is a directory" in refused(tmp_path)


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert "the file is empty" in refused(path)


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"just some text\n" * 10, b"PK\x03\x04" + os.urandom(200)],
    ids=["random", "text", "broken-zip"],
)
def test_garbage_is_refused_as_not_a_model(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    message = refused(path)
    assert "not a model file" in message
    assert "arbitrary unpickling" not in message  # garbage is not an attack: say what it is


def test_a_truncated_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    path = tmp_path / "cut.pt"
    path.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    assert "not a model file" in refused(path)


def test_weights_of_the_wrong_shapes_are_refused(tmp_path):
    state_dict = DigitCNN().state_dict()
    state_dict["fc1.weight"] = torch.zeros(128, 100)
    path = tmp_path / "wrong.pt"
    torch.save({"model_state_dict": state_dict}, path)
    message = refused(path)
    assert "do not fit architecture 'digit_cnn'" in message
    assert "fc1.weight" in message


def test_weights_missing_layers_are_refused(tmp_path):
    state_dict = {k: v for k, v in DigitCNN().state_dict().items() if not k.startswith("fc2")}
    path = tmp_path / "partial.pt"
    torch.save(state_dict, path)
    assert "fc2" in refused(path)


def test_an_unknown_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model_state_dict": DigitCNN().state_dict(), "metadata": {"architecture": "resnet9000"}}, path)
    message = refused(path)
    assert "unknown architecture 'resnet9000'" in message
    assert "digit_cnn" in message  # and the ones it knows


def test_an_input_shape_the_architecture_cannot_take_is_refused_at_load(tmp_path):
    path = write_template_checkpoint(tmp_path / "big.pt", metadata={"input_shape": [1, 32, 32]})
    assert "input_shape [1, 32, 32] does not fit architecture 'digit_cnn'" in refused(path)


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"labels": []}, "labels"),
        ({"input_shape": [2, 28, 28]}, "input_shape"),
        ({"normalize": {"mean": [0.5]}}, "normalize"),
        ({"normalize": {"mean": [0.5], "std": [0.0]}}, "normalize"),
    ],
)
def test_bad_metadata_is_refused(tmp_path, metadata, problem):
    path = write_template_checkpoint(tmp_path / "meta.pt", metadata=metadata)
    assert problem in refused(path)


def test_a_dict_that_holds_no_weights_is_refused(tmp_path):
    path = tmp_path / "results.pt"
    torch.save({"accuracy": 0.99, "epoch": 4}, path)
    assert "unrecognised checkpoint" in refused(path)


class Payload:
    """Unpickling this makes a directory: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_file_that_needs_arbitrary_unpickling_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": DigitCNN().state_dict(), "extra": Payload(marker)}, path)

    message = refused(path)

    assert "arbitrary unpickling" in message
    assert "posix.mkdir" in message or "os.mkdir" in message
    assert not marker.exists()
    # The file really is hostile: a loader that trusts it runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_plain_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"evil-{protocol}.pkl"
        path.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
        refused(path)
        assert not marker.exists()


def test_no_model_configured_names_the_setting():
    with pytest.raises(ModelLoadError, match="PRED_MODEL_PATH: not set"):
        ModelRegistry().load()


# -- devices ------------------------------------------------------------------------------------


@pytest.fixture
def no_accelerator(monkeypatch):
    """As on this project's CI machines: neither CUDA nor MPS, whatever the test machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_cpu_when_no_accelerator_is_asked_for():
    device, why, _ = select_device(False, False)
    assert device == torch.device("cpu")
    assert "USE_CUDA is not set" in why and "USE_MPS is not set" in why


def test_use_cuda_without_cuda_falls_back_to_cpu_and_says_why(no_accelerator):
    device, why, _ = select_device(True, False)
    assert device == torch.device("cpu")
    assert "USE_CUDA is set but CUDA is not available" in why


def test_use_mps_without_mps_falls_back_to_cpu_and_says_why(no_accelerator):
    device, why, _ = select_device(False, True)
    assert device == torch.device("cpu")
    assert "USE_MPS is set but MPS is not available" in why
    device, why, _ = select_device(True, True)
    assert device == torch.device("cpu")
    assert "CUDA is not available" in why and "MPS is not available" in why


def test_cuda_is_preferred_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device(True, True)[0] == torch.device("cuda")
    assert select_device(False, True)[0] == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, why, _ = select_device(True, True)
    assert device == torch.device("mps")
    assert "CUDA is not available" in why


def test_real_cuda_availability_is_honoured():
    device, _, _ = select_device(True, False)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("variable", ["USE_CUDA", "USE_MPS"])
def test_the_app_falls_back_to_cpu_and_logs_why(monkeypatch, caplog, make_app, no_accelerator, variable):
    monkeypatch.setenv(variable, "1")
    app = make_app()
    assert app.config[variable] is True
    caplog.set_level(logging.INFO, logger="service.registry")

    version = app.test_client().get("/api/v1/model/version")

    assert version.status_code == 200
    assert version.json["data"]["device"] == "cpu"
    device_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving on ")]
    assert len(device_lines) == 1
    backend = "CUDA" if variable == "USE_CUDA" else "MPS"
    assert device_lines[0].startswith("serving on cpu: ")
    assert f"{variable} is set but {backend} is not available" in device_lines[0]
    response = app.test_client().post("/api/v1/model/predict", data={"image_file": (io.BytesIO(images.png(0)), "0.png")})
    assert response.status_code == 200


# -- provenance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "uuid"),
    [
        ("models/abc123/model/model.pt", "abc123"),
        ("/srv/app/models/0f1e2d/model/model.pt", "0f1e2d"),
        ("/srv/app/models/0f1e2d/model/weights.pth", "0f1e2d"),
        ("/srv/app/model.pt", None),
        ("/srv/app/models/0f1e2d/model.pt", None),
        ("/srv/app/models/0f1e2d/model/nested/model.pt", None),
        ("/srv/app/mymodels/0f1e2d/model/model.pt", None),
    ],
)
def test_the_model_uuid_is_read_from_the_models_layout(path, uuid):
    assert model_uuid_from_path(path) == uuid


def test_the_model_uuid_defaults_to_the_run_directory(make_app, tiny_checkpoint):
    version = make_app().test_client().get("/api/v1/model/version").json["data"]
    assert tiny_checkpoint.parts[-3] == RUN_ID
    assert version["model_uuid"] == RUN_ID


def test_an_explicit_model_uuid_wins(make_app):
    version = make_app(PRED_MODEL_UUID="chosen-by-operator").test_client().get("/api/v1/model/version").json["data"]
    assert version["model_uuid"] == "chosen-by-operator"


def test_the_model_uuid_is_derived_from_a_relative_path_in_the_environment(monkeypatch, tmp_path, tiny_checkpoint):
    store = tiny_checkpoint.parents[3]  # .../store, holding models/<run_id>/model/model.pt
    monkeypatch.chdir(store)
    settings = from_env({"PRED_MODEL_PATH": f"models/{RUN_ID}/model/model.pt"})
    served = ModelRegistry.from_config(settings.as_config())
    served.get()
    assert served.info["model_uuid"] == RUN_ID
    assert served.info["model_path"] == str(tiny_checkpoint)
    explicit = ModelRegistry.from_config(
        from_env({"PRED_MODEL_PATH": str(tiny_checkpoint), "PRED_MODEL_UUID": "mine"}).as_config()
    )
    explicit.get()
    assert explicit.info["model_uuid"] == "mine"


def test_a_model_without_the_layout_has_no_uuid(tmp_path):
    path = write_template_checkpoint(tmp_path / "anywhere.pt")
    assert load(path).info["model_uuid"] is None


def test_the_registry_records_what_it_serves(tiny_checkpoint):
    served = load(tiny_checkpoint)
    info = served.info
    assert info["model_path"] == str(tiny_checkpoint)
    assert info["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert info["architecture"] == "digit_cnn"
    assert info["labels"] == DIGITS
    assert info["input_shape"] == [1, 28, 28]
    assert info["device"] == "cpu"
    assert datetime.fromisoformat(info["loaded_at"]).utcoffset() is not None
    assert served.ready and served.problem is None


def test_a_registry_is_not_ready_until_warmed_up(tiny_checkpoint):
    served = registry_for(tiny_checkpoint)
    assert not served.ready and served.state is State.EMPTY
    served.load()
    assert not served.ready and served.state is State.LOADED and "warmed it up" in served.problem
    served.prepare_worker(threads=torch.get_num_threads())
    assert served.ready and served.state is State.READY


def test_two_apps_in_one_process_never_share_a_model(make_app, tmp_path):
    other = write_template_checkpoint(tmp_path / "other.pt", seed=9)
    first, second = make_app(), make_app(PRED_MODEL_PATH=str(other))
    first_version = first.test_client().get("/api/v1/model/version").json["data"]
    second_version = second.test_client().get("/api/v1/model/version").json["data"]
    assert first_version["sha256"] != second_version["sha256"]
    assert first.extensions["model_registry"] is not second.extensions["model_registry"]


def test_a_program_is_refused_unless_programs_are_allowed(tmp_path):
    path = write_torchscript(tmp_path / "colour.pt", COLOUR_METADATA)
    with pytest.raises(ModelLoadError, match=r"TorchScript archive is a program .*ALLOW_MODEL_PROGRAMS=1"):
        ModelRegistry.from_config({"PRED_MODEL_PATH": str(path)}).load()
    assert load(path).info["architecture"] == "torchscript:ColourNet"  # with ALLOW_MODEL_PROGRAMS


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    assert "not a regular file" in refused(fifo)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tiny_checkpoint):
    message = refused_with(tiny_checkpoint, MAX_MODEL_FILE_SIZE=1000)
    assert "over the limit of 1000 (MAX_MODEL_FILE_SIZE)" in message


def refused_with(path, **settings):
    with pytest.raises(ModelLoadError) as caught:
        load(path, **settings)
    return str(caught.value)


# -- rollouts: every state change, without gunicorn ---------------------------------------------


def predict_one(served_version):
    """What one request does with the version it took: classify a digit."""
    decoded = decode_image(images.png(0), "0.png", 10**8)
    return served_version.classifier.predict([decoded])[0]


def test_a_changed_file_is_swapped_in_and_requests_keep_the_version_they_took(tmp_path):
    path = write_template_checkpoint(tmp_path / "models" / "run1" / "model" / "model.pt", seed=1)
    served = load(path)
    before = served.get()
    assert before.version == "run1"

    write_template_checkpoint(path, seed=2)  # the operator replaces the file
    rollout = served.refresh()

    assert rollout.outcome is Outcome.SWAPPED
    after = served.get()
    assert after is not before and served.ready
    assert after.info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert served.info["rollout"]["result"] == "swapped"
    # A request that took the old version before the swap finishes on it, whole.
    assert predict_one(before).label in DIGITS and before.info["sha256"] != after.info["sha256"]


def test_an_unchanged_file_is_left_as_it_is(tiny_checkpoint):
    served = load(tiny_checkpoint)
    before = served.get()
    assert served.refresh().outcome is Outcome.UNCHANGED
    assert served.get() is before
    assert "rollout" not in served.info  # nothing happened worth reporting


def test_a_broken_new_file_is_refused_and_the_served_model_stays(tmp_path):
    path = write_template_checkpoint(tmp_path / "model.pt", seed=1)
    served = load(path)
    before = served.get()
    path.write_bytes(b"not a model at all" * 10)

    rollout = served.refresh()

    assert rollout.outcome is Outcome.REFUSED and "not a model file" in rollout.reason
    assert served.get() is before and served.ready
    assert served.info["rollout"]["result"] == "refused"


def test_a_new_version_that_fails_its_warm_up_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    write_torchscript(path, COLOUR_METADATA)
    served = load(path)
    before = served.get()
    write_torchscript(path, {"labels": ["red", "green", "blue", "grey"], "input_shape": [3, 32, 32]})

    rollout = served.refresh()

    assert rollout.outcome is Outcome.REFUSED
    assert "3 classes but the model has 4 labels" in rollout.reason
    assert served.get() is before and served.ready and served.problem is None
    shown = served.info["rollout"]
    assert shown["result"] == "refused" and shown["version"] == rollout.version and "4 labels" in shown["reason"]


def test_in_the_master_a_new_version_stays_loaded_for_the_workers_to_prepare(tmp_path):
    path = write_template_checkpoint(tmp_path / "model.pt", seed=1)
    master = registry_for(path)
    master.load()
    write_template_checkpoint(path, seed=2)

    assert master.refresh().outcome is Outcome.SWAPPED
    assert master.state is State.LOADED  # the master never serves: it checked on the CPU, nothing more
    assert master.current.info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


class PointedSource:
    """A model source whose alias the test moves: the file is the same, the version it points at changes."""

    setting = "PRED_MODEL_URI"
    follows = True

    def __init__(self, path):
        self.path, self.version = path, "1"

    def peek(self):
        return self.version

    def locate(self):
        from service.sources import Located

        return Located(self.path, {"model_version": self.version})


def test_the_pending_version_is_one_neither_served_nor_refused(tmp_path):
    path = tmp_path / "model.pt"
    write_torchscript(path, COLOUR_METADATA)
    source = PointedSource(path)
    served = ModelRegistry(source, allow_programs=True)
    served.get()
    assert served.pending_version() is None

    source.version = "2"
    write_torchscript(path, {"labels": ["red", "green", "blue", "grey"], "input_shape": [3, 32, 32]})
    assert served.pending_version() == "2"
    assert served.refresh().outcome is Outcome.REFUSED
    assert served.pending_version() is None  # refused once: not tried again until the alias moves

    source.version = "3"
    write_torchscript(path, COLOUR_METADATA)
    assert served.pending_version() == "3"
    assert served.refresh().outcome is Outcome.SWAPPED
    assert served.get().version == "3"


def test_the_alias_watcher_notifies_only_for_a_new_version(tmp_path):
    path = tmp_path / "model.pt"
    write_torchscript(path, COLOUR_METADATA)
    source = PointedSource(path)
    served = ModelRegistry(source, allow_programs=True)
    served.load()
    notified = []
    watcher = AliasWatcher(served, 0.05, lambda: notified.append(source.version))
    watcher.start()
    try:
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            time.sleep(0.05)
        assert notified == []
        source.version = "2"
        deadline = time.monotonic() + 5
        while not notified and time.monotonic() < deadline:
            time.sleep(0.05)
        assert notified and set(notified) == {"2"}
    finally:
        watcher.stop()
        watcher.join(5)
    assert not watcher.is_alive()


def test_with_verify_model_on_start_a_version_that_fails_its_parity_check_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    write_torchscript(path, COLOUR_METADATA)
    source = PointedSource(path)  # provenance without an MLflow run: nothing to check parity against
    master = ModelRegistry(source, allow_programs=True, verify_on_start=True)
    master.load()  # the master loads; the parity check of the first version runs in the workers
    source.version = "2"

    rollout = master.refresh()

    assert rollout.outcome is Outcome.REFUSED and rollout.version == "2"
    assert rollout.reason.startswith("parity check failed: no MLflow run id to compare with")
    assert master.current.version == "1"


# -- faults: every error is an outcome, a bad version is refused once ---------------------------


class FaultySource(PointedSource):
    """A pointed source whose ``locate`` raises what the test sets, for the versions it names."""

    def __init__(self, path):
        super().__init__(path)
        self.faults, self.located = {}, 0

    def locate(self):
        self.located += 1
        fault = self.faults.get(self.version)
        if fault is not None:
            raise fault
        return super().locate()


def watched(source, **settings):
    """A master's registry for ``source`` (loaded, not serving) and the outcomes it counted."""
    master = ModelRegistry(source, allow_programs=True, **settings)
    master.load()
    counted = []
    master.on_rollout = lambda rollout: counted.append((rollout.outcome.value, rollout.version))
    return master, counted


def test_a_permanent_source_error_refuses_the_version_once_and_the_watcher_never_asks_again(tmp_path):
    from service.sources import SourceError

    path = write_torchscript(tmp_path / "model.pt", COLOUR_METADATA)
    source = FaultySource(path)
    master, counted = watched(source)
    source.version = "2"
    source.faults["2"] = SourceError("PRED_MODEL_URI: run abc has no model/model.pt artifact", refused=True, version="2")
    notified = []
    watcher = AliasWatcher(master, 1, lambda: notified.append(1))
    located = source.located

    assert watcher.look() is True
    for _ in range(5):  # each poll: the alias still points at the refused version
        assert watcher.look() is True

    assert counted == [("refused", "2")] and source.located == located + 1 and notified == []
    assert master.last_rollout.outcome is Outcome.REFUSED and master.last_rollout.version == "2"
    assert "has no model/model.pt artifact" in master.last_rollout.reason
    assert master.info["rollout"]["result"] == "refused" and master.current.version == "1"


def test_a_transient_source_error_is_tried_again_later_with_a_growing_delay(tmp_path):
    from service.registry import RETRY_MAX_SECONDS, retry_delay
    from service.sources import SourceError

    path = write_torchscript(tmp_path / "model.pt", COLOUR_METADATA)
    source = FaultySource(path)
    master, counted = watched(source)
    source.version = "2"
    source.faults["2"] = SourceError("PRED_MODEL_URI: cannot reach the MLflow tracking server")
    notified = []
    watcher = AliasWatcher(master, 1, lambda: notified.append(1))

    assert watcher.look() is False and watcher.look() is False
    assert counted == [("failed", "2"), ("failed", "2")] and notified == []
    assert master.info["rollout"]["result"] == "failed" and master.info["rollout"]["version"] == "2"
    assert [retry_delay(n, 2) for n in (1, 2, 3)] == [4, 8, 16] and retry_delay(30, 2) == RETRY_MAX_SECONDS

    del source.faults["2"]  # the server is back
    assert watcher.look() is True and notified == [1]
    assert master.staged.version == "2" and master.current.version == "1"  # checked, waiting for the reload
    assert watcher.look() is True and notified == [1]  # staged: nothing more until the reload


@pytest.mark.parametrize(
    "fault", [PermissionError(13, "Permission denied"), MemoryError(), KeyError("bug"), asyncio.CancelledError()]
)
def test_an_unexpected_exception_is_logged_once_with_its_traceback_and_refuses_the_version(tmp_path, caplog, fault):
    path = write_torchscript(tmp_path / "model.pt", COLOUR_METADATA)
    source = FaultySource(path)
    master, counted = watched(source)
    source.version = "2"
    source.faults["2"] = fault
    watcher = AliasWatcher(master, 1, lambda: None)

    with caplog.at_level(logging.ERROR):
        assert watcher.look() is True and watcher.look() is True
        rollout = master.refresh()  # an operator's SIGHUP: looked at there and then, never raised

    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2, "once by the watcher, once by the operator's reload"
    assert rollout.outcome is Outcome.REFUSED and rollout.reason.startswith("unexpected error: ")
    assert counted == [("refused", "2"), ("refused", "2")]
    assert master.current.version == "1"


def test_the_reload_swaps_in_the_staged_candidate_without_reading_it_again(tmp_path, caplog):
    path = write_torchscript(tmp_path / "model.pt", COLOUR_METADATA)
    source = PointedSource(path)
    master, counted = watched(source)
    source.version = "2"
    assert master.stage("2").outcome is Outcome.STAGED
    staged = master.staged

    with caplog.at_level(logging.INFO, logger="service.registry"):
        rollout = master.refresh()

    assert rollout.outcome is Outcome.SWAPPED and master.current is staged and master.staged is None
    assert not [r for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert counted == [("swapped", "2")]


def test_an_unchanged_version_costs_a_hash_not_a_load(tiny_checkpoint, caplog):
    served = load(tiny_checkpoint)
    with caplog.at_level(logging.INFO, logger="service.registry"):
        assert served.refresh().outcome is Outcome.UNCHANGED
    assert not [r for r in caplog.records if r.getMessage().startswith("loaded ")]


def test_a_parity_check_that_could_not_run_is_reported_as_such_and_run_again(tmp_path, monkeypatch):
    from service import verify

    path = write_torchscript(tmp_path / "model.pt", COLOUR_METADATA)
    reports = [verify.VerifyReport(False, "cannot read the accuracy logged on run r: server down", ran=False)]
    monkeypatch.setattr(verify, "verify_classifier", lambda classifier, run_id, **options: reports[0])
    master = ModelRegistry(PointedSource(path), allow_programs=True, verify_on_start=True)
    master.load()
    assert master.unchecked()

    worker = master  # what a worker forked now does with the master's result
    worker.prepare_worker()
    assert worker.state is State.UNCHECKED and not worker.ready
    assert worker.reason == "the parity check could not run yet"
    assert worker.problem.startswith("parity check could not run") and "server down" in worker.problem

    notified = []
    watcher = AliasWatcher(master, 1, lambda: notified.append(1), follow=False)
    assert watcher.look() is False and notified == []  # still down: tried again later
    reports[0] = verify.VerifyReport(True, "accuracy 99%")
    assert watcher.look() is True and len(notified) == 1  # ran: the workers are reloaded to learn it
    assert not master.unchecked()


def test_an_operators_reload_while_a_candidate_is_staged_neither_looks_again_nor_swaps_it_twice(tmp_path):
    path = write_torchscript(tmp_path / "model.pt", COLOUR_METADATA)
    source = BlockingSource(path)
    master, counted = watched(source)
    source.version = "2"
    source.release.clear()
    staging = threading.Thread(target=master.stage, args=("2",))
    staging.start()
    try:
        assert source.entered.wait(10)  # the watcher is fetching version 2
        located = source.located
        rollout = master.refresh()  # the operator's SIGHUP meanwhile
        assert rollout.outcome is Outcome.UNCHANGED and master.current.version == "1"
        assert source.located == located, "the reload looked at the source again"
    finally:
        source.release.set()
        staging.join(10)
    assert master.staged.version == "2"
    assert master.refresh().outcome is Outcome.SWAPPED and master.current.version == "2"  # the watcher's SIGHUP

    # The same candidate staged again (it was swapped in meanwhile): dropped, not swapped twice.
    master.staged = master.current
    assert master.refresh().outcome is Outcome.UNCHANGED and master.staged is None
    assert counted == [("swapped", "2")]


class BlockingSource(FaultySource):
    """A pointed source whose ``locate`` waits for the test: a download that takes a while."""

    def __init__(self, path):
        super().__init__(path)
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def locate(self):
        if self.version != "1":
            self.entered.set()
        assert self.release.wait(10)
        return super().locate()


@pytest.mark.parametrize("field", ["reason", "version"])
def test_a_rollout_too_long_for_the_shared_record_is_cut_and_still_read_back(field):
    from service.registry import Rollout, SharedRecord

    shared = SharedRecord()
    # An upstream error text in emoji: each character takes 12 bytes of JSON.
    rollout = {"reason": "parity check failed", "version": "7", field: "\N{GRINNING FACE}" * 3000}
    shared.set(Rollout(Outcome.REFUSED, rollout["version"], rollout["reason"]).as_dict())

    read = shared.get()
    assert read is not None, "the workers would see no rollout at all"
    assert read["result"] == "refused" and read["at"]
    assert read[field].startswith("\N{GRINNING FACE}" * 10) and read[field].endswith("…")
    assert len(json.dumps(read).encode()) < SharedRecord.SIZE


class CountedReads(dict):
    """An app's config that counts how often each setting is read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = {}

    def _read(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1

    def __getitem__(self, key):
        self._read(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._read(key)
        return super().get(key, default)


def test_the_model_options_are_read_once_and_the_source_checks_downloads_with_them(tmp_path):
    config = CountedReads(
        PRED_MODEL_URI="models:/digits@champion", MODELS_DIR=str(tmp_path), ALLOW_MODEL_PROGRAMS=True,
        MODEL_CODE_MODULES=["acme.nets"], MAX_MODEL_FILE_SIZE=8 * 1024**2,
    )
    registry = ModelRegistry.from_config(config)
    options = ("ALLOW_MODEL_PROGRAMS", "MODEL_CODE_MODULES", "MAX_MODEL_FILE_SIZE")
    assert {name: config.reads.get(name) for name in options} == dict.fromkeys(options, 1)
    source = registry.source
    assert (source.allow_programs, source.code_modules, source.max_file_size) == (True, ("acme.nets",), 8 * 1024**2)
    assert (registry.allow_programs, registry.code_modules, registry.max_file_size) == (True, ("acme.nets",), 8 * 1024**2)
    assert source.models_dir == str(tmp_path) and source.uri == "models:/digits@champion"
