"""Serving the classifier a team trained: torchvision networks and the project's own, from plain
weights, with torchvision's preprocessing, on photos decoded at the scale they need."""

import importlib
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision import models
from torchvision import transforms

from config.settings import ConfigError, from_env
from service import create_app
from service.architectures import ArchitectureError, build, classification_models, resolve, weights_preset
from service.formats import ModelFileError, read_model_file
from service.images import ImageError, decode_image
from service.preprocess import InputSpec, preprocess
from service.registry import ModelRegistry, Outcome
from tests.support import ROOT, SERVICE_VARIABLES, encode, flask, project_package, run_gunicorn

PREDICT = "/api/v1/model/predict"
LABELS = [f"class-{i}" for i in range(10)]
CLEAN = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}

# At least eight families: residual, mobile, compound-scaled, ConvNeXt, RegNet, vision
# transformer, shifted-window transformer, dense, channel-shuffle and squeeze networks.
FAMILIES = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "mobilenet_v3_small": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
    "convnext_tiny": "ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
    "regnet_y_400mf": "RegNet_Y_400MF_Weights.IMAGENET1K_V2",
    "vit_b_16": "ViT_B_16_Weights.IMAGENET1K_V1",
    "swin_t": "Swin_T_Weights.IMAGENET1K_V1",
    "densenet121": "DenseNet121_Weights.IMAGENET1K_V1",
    "shufflenet_v2_x0_5": "ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1",
    "squeezenet1_1": "SqueezeNet1_1_Weights.IMAGENET1K_V1",
}


def network(name, classes=len(LABELS), seed=0):
    """A torchvision classifier with random weights (nothing downloaded), in eval mode."""
    torch.manual_seed(seed)
    return models.get_model(name, weights=None, num_classes=classes).eval()


def tempered(net, photo, transform, spread=2.0):
    """Scale ``net``'s output layer so its logits on ``photo`` spread like a trained network's
    (random weights give logits in the hundreds, whose softmax is one-hot; some heads start at zero)."""
    last = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    with torch.no_grad():
        if not last.weight.any():
            last.weight.normal_(0, 0.01)
        with torch.inference_mode():
            logits = net(transform(photo).unsqueeze(0))
        last.weight *= spread / float(logits.std())
        last.bias.zero_()
    return net


def checkpoint(path, net, **metadata):
    torch.save({"model_state_dict": net.state_dict(), "metadata": metadata}, path)
    return path


def probabilities(net, tensor):
    with torch.inference_mode():
        return torch.softmax(net(tensor.unsqueeze(0)).float(), dim=1)[0]


def served_probabilities(client, data, name="photo"):
    response = client.post(PREDICT, query_string={"top_k": 1000}, data={"image_file": (io.BytesIO(data), name)})
    assert response.status_code == 200, response.get_json()
    ranked = response.get_json()["data"][0]["top_k"]
    return {entry["label"]: entry["probability"] for entry in ranked}


def as_vector(by_label, labels=LABELS):
    return torch.tensor([by_label[label] for label in labels], dtype=torch.float64)


@pytest.fixture(scope="module")
def photo():
    """A real photo (scikit-learn's china.jpg, 640x427), as the decoded PIL image."""
    return Image.fromarray(load_sample_images().images[0])


@pytest.fixture(scope="module")
def photo_png(photo):
    """The photo as a PNG: decoded whole, never reduced (427 is under twice a 256 resize)."""
    return encode(photo, "PNG")


@pytest.fixture(scope="module")
def big_jpeg(photo):
    """A 12 MP (4000x3000) JPEG with a photo's fine texture, as a phone takes them."""
    rng = np.random.default_rng(0)
    big = np.asarray(photo.resize((4000, 3000), Image.Resampling.BICUBIC), dtype=np.int16)
    big = np.clip(big + rng.integers(-6, 7, size=big.shape), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(big), "JPEG", quality=90)


# -- any torchvision classifier equals torchvision's own pipeline ---------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_a_torchvision_state_dict_serves_as_torchvision_pipeline_answers(tmp_path, name, photo, photo_png):
    weights = FAMILIES[name]
    transform = models.get_weight(weights).transforms()
    net = tempered(network(name), photo, transform)
    path = checkpoint(tmp_path / "model.pt", net, architecture=f"torchvision:{name}", weights=weights, labels=LABELS)
    client = create_app({"TESTING": True, "PRED_MODEL_PATH": str(path)}).test_client()

    served = as_vector(served_probabilities(client, photo_png, "photo.png"))

    expected = probabilities(net, transform(photo)).double()
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
    assert float(served.max()) < 0.99  # the comparison is of real spreads, not two one-hot vectors


def test_explicit_preprocessing_equals_the_torchvision_transforms_it_describes(tmp_path, photo, photo_png):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    transform = transforms.Compose([
        transforms.Resize(160, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(128),
        transforms.PILToTensor(),
        transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize(mean, std),
    ])
    net = tempered(network("regnet_y_400mf"), photo, transform)
    path = checkpoint(
        tmp_path / "model.pt", net, architecture="torchvision:regnet_y_400mf", labels=LABELS,
        preprocess={"resize": 160, "crop": 128, "interpolation": "bicubic"},
        normalize={"mean": mean, "std": std}, input_shape=[3, 128, 128],
    )
    model = read_model_file(path)
    assert model.classifier.input_spec == InputSpec(3, 128, 128, tuple(mean), tuple(std), "none", 160, "bicubic")
    client = create_app({"TESTING": True, "PRED_MODEL_PATH": str(path)}).test_client()
    served = as_vector(served_probabilities(client, photo_png))
    torch.testing.assert_close(served, probabilities(net, transform(photo)).double(), atol=1e-5, rtol=0)


def test_the_labels_default_to_the_weights_categories(tmp_path):
    path = checkpoint(
        tmp_path / "m.pt", network("mobilenet_v3_small", classes=1000), architecture="torchvision:mobilenet_v3_small",
        weights="MobileNet_V3_Small_Weights.IMAGENET1K_V1",
    )
    model = read_model_file(path)
    assert len(model.classifier.labels) == 1000
    assert model.classifier.labels[:2] == ("tench", "goldfish")
    assert model.classifier.input_spec.shape == (3, 224, 224)


# -- photos: decoded at the scale the network needs -------------------------------------------------


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory, photo):
    weights = "ResNet18_Weights.IMAGENET1K_V1"
    transform = models.get_weight(weights).transforms()
    net = tempered(network("resnet18"), photo, transform)
    path = checkpoint(
        tmp_path_factory.mktemp("photo") / "model.pt", net, architecture="torchvision:resnet18", weights=weights,
        labels=LABELS,
    )
    return path, net, transform


def test_a_phone_jpeg_is_decoded_at_reduced_scale_and_answers_within_a_hundredth(photo_model, big_jpeg):
    path, net, transform = photo_model
    spec = read_model_file(path).classifier.input_spec
    assert decode_image(big_jpeg, "big.jpg", 4096 * 4096, keep=spec.decode_size()).size == (1000, 750)
    client = create_app({"TESTING": True, "PRED_MODEL_PATH": str(path)}).test_client()

    served = as_vector(served_probabilities(client, big_jpeg, "big.jpg"))

    full = probabilities(net, transform(Image.open(io.BytesIO(big_jpeg)).convert("RGB"))).double()
    assert float((served - full).abs().max()) <= 0.01
    assert float(full.max()) < 0.99


def jpeg_of(side_x, side_y, **params):
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, size=(side_y // 100, side_x // 100, 3), dtype=np.uint8)
    return encode(Image.fromarray(small).resize((side_x, side_y), Image.Resampling.BILINEAR), "JPEG", **params)


def test_a_48_megapixel_jpeg_is_classified_and_a_48_megapixel_png_refused(photo_model):
    path, _, _ = photo_model
    client = create_app({"TESTING": True, "PRED_MODEL_PATH": str(path)}).test_client()  # MAX_IMAGE_PIXELS 16.7 MP
    jpeg = jpeg_of(8000, 6000, quality=80)
    response = client.post(PREDICT, data={"image_file": (io.BytesIO(jpeg), "48mp.jpg")})
    assert response.status_code == 200, response.get_json()

    png = encode(Image.new("RGB", (8000, 6000), (120, 130, 140)), "PNG")
    response = client.post(PREDICT, data={"image_file": (io.BytesIO(png), "48mp.png")})
    assert response.status_code == 422
    assert "8000x6000" in response.get_json()["message"] and "MAX_IMAGE_PIXELS" in response.get_json()["message"]


def test_a_jpeg_too_large_even_at_an_eighth_and_a_large_progressive_jpeg_are_refused():
    keep = InputSpec(3, 224, 224, resize=256).decode_size()
    with pytest.raises(ImageError, match="4 x MAX_IMAGE_PIXELS"):
        decode_image(jpeg_of(8000, 6000), "huge.jpg", 8000 * 6000 // 5, keep=keep)
    # libjpeg holds every coefficient of a progressive JPEG at full size: its declared size counts.
    progressive = jpeg_of(8000, 6000, progressive=True)
    with pytest.raises(ImageError, match="8000x6000.*MAX_IMAGE_PIXELS"):
        decode_image(progressive, "progressive.jpg", 4096 * 4096, keep=keep)
    assert decode_image(progressive, "progressive.jpg", 8000 * 6000, keep=keep).size == (1000, 750)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import io, sys
    from PIL import Image
    from service.formats import read_model_file

    def peak_mb(call):
        # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one.
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
        call()
        peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
        return (peak - before) / 1024

    classifier = read_model_file(sys.argv[1]).classifier
    data = open(sys.argv[2], "rb").read()
    classifier.prepare(data, "warm.jpg", 4096 * 4096)
    served = peak_mb(lambda: classifier.prepare(data, "big.jpg", 4096 * 4096))
    naive = peak_mb(lambda: Image.open(io.BytesIO(data)).convert("RGB"))
    print(served, naive)
    """
)


def test_a_12_megapixel_jpeg_request_peaks_at_a_fraction_of_the_full_decode(tmp_path, photo_model, big_jpeg):
    path, _, _ = photo_model
    (tmp_path / "big.jpg").write_bytes(big_jpeg)
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), str(tmp_path / "big.jpg")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    served, naive = map(float, result.stdout.split())
    # The full decode alone holds 4000x3000x3 bytes (34 MiB); the service decodes 1000x750 (2 MiB).
    assert naive > 30, f"the measurement does not see the full decode ({naive:.1f} MiB)"
    assert served < 10, f"a 12 MP JPEG took {served:.1f} MiB at its peak (the full decode takes {naive:.1f} MiB)"


# -- the Open Inference Protocol shows and takes the real input ----------------------------------


def test_the_open_inference_protocol_shows_and_takes_a_photo_networks_input(photo_model, photo):
    path, net, transform = photo_model
    client = create_app({"TESTING": True, "PRED_MODEL_PATH": str(path), "PRED_MODEL_NAME": "photos"}).test_client()
    metadata = client.get("/v2/models/photos").get_json()
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]} in metadata["inputs"]
    batch = torch.stack([transform(photo), transform(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape),
                        "data": batch.flatten().tolist()}]}
    response = client.post("/v2/models/photos/infer", json=body)
    assert response.status_code == 200, response.get_json()
    (output,) = [o for o in response.get_json()["outputs"] if o["name"] == "probabilities"]
    with torch.inference_mode():
        expected = torch.softmax(net(batch), dim=1)
    np.testing.assert_allclose(np.array(output["data"]).reshape(2, -1), expected.numpy(), atol=1e-5)


# -- refusals, each in one line --------------------------------------------------------------------


def refusal(path, **settings):
    with pytest.raises(ModelFileError) as caught:
        read_model_file(path, **settings)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"architecture": "torchvision:resnet19"}, "no such torchvision classifier; flask --app wsgi model architectures"),
        ({"architecture": "torchvision:fasterrcnn_resnet50_fpn"}, "detection network, not an image classifier"),
        ({"architecture": "torchvision:deeplabv3_resnet50"}, "segmentation network"),
        ({"architecture": "torchvision:r3d_18"}, "video network"),
        ({"architecture": "torchvision:raft_small"}, "optical flow network"),
        ({"architecture": "torchvision:quantized_resnet18"}, "quantized torchvision classifier, built for int8 "
         "inference: serve its float network (torchvision:resnet18)"),
        ({"architecture": "resnet18"}, "unknown architecture 'resnet18'"),
        ({"architecture": "torchvision:mobilenet_v3_small", "weights": "NoSuch_Weights.V1"}, "unknown weights"),
        ({"architecture": "torchvision:mobilenet_v3_small", "weights": "ResNet18_Weights.IMAGENET1K_V1"},
         "are torchvision:resnet18's, not 'torchvision:mobilenet_v3_small'"),
        ({"architecture": "torchvision:mobilenet_v3_small", "labels": LABELS},
         "needs its input described: give weights"),
        ({"architecture": "torchvision:mobilenet_v3_small", "labels": LABELS,
          "preprocess": {"resize": 200, "crop": 224}}, "the crop 224x224 is larger than the resize 200"),
        ({"architecture": "torchvision:mobilenet_v3_small", "labels": LABELS, "preprocess": {"resize": 0}},
         "resize (the shorter side) must be a positive whole number"),
        ({"architecture": "torchvision:mobilenet_v3_small", "labels": LABELS,
          "preprocess": {"resize": 256, "crop": -3}}, "crop must be a positive whole number"),
        ({"architecture": "torchvision:mobilenet_v3_small", "labels": LABELS,
          "preprocess": {"resize": 256, "crop": 224, "interpolation": "sharpest"}}, "interpolation must be one of"),
        ({"architecture": "torchvision:mobilenet_v3_small", "labels": LABELS,
          "preprocess": {"resize": 256, "rotate": 90}}, "unknown step(s) rotate"),
        ({"architecture": "torchvision:mobilenet_v3_small", "weights": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
          "labels": LABELS, "architecture_args": {"dropout": {"p": 1}}}, "must be a JSON number, string, boolean"),
        ({"architecture": "torchvision:mobilenet_v3_small", "weights": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
          "labels": LABELS, "architecture_args": {"num_classes": 3}}, "num_classes comes from the number of labels"),
        ({"architecture": "torchvision:mobilenet_v3_small", "weights": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
          "labels": LABELS, "architecture_args": {"dropout": None}}, "architecture_args: dropout must be"),
        ({"architecture": "torchvision:mobilenet_v3_small", "weights": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
          "labels": LABELS, "architecture_args": {"dropout": "high"}}, "cannot build 'torchvision:mobilenet_v3_small'"),
    ],
)
def test_bad_architectures_and_preprocessing_are_refused_in_one_line(tmp_path, metadata, expected):
    path = checkpoint(tmp_path / "m.pt", network("mobilenet_v3_small"), **metadata)
    assert expected in refusal(path)


def test_labels_that_do_not_match_the_output_layer_are_refused_saying_both_counts(tmp_path):
    path = checkpoint(
        tmp_path / "m.pt", network("resnet18", classes=10), architecture="torchvision:resnet18",
        weights="ResNet18_Weights.IMAGENET1K_V1", labels=["cat", "dog"],
    )
    message = refusal(path)
    assert "the model has 2 labels but the weights of 'torchvision:resnet18' give 10 outputs" in message
    assert "fc.weight" in message


def test_the_state_dict_of_another_network_is_refused_naming_the_first_keys_that_do_not_fit(tmp_path):
    path = checkpoint(
        tmp_path / "m.pt", network("resnet18"), architecture="torchvision:mobilenet_v3_small",
        weights="MobileNet_V3_Small_Weights.IMAGENET1K_V1", labels=LABELS,
    )
    message = refusal(path)
    assert "weights do not fit architecture 'torchvision:mobilenet_v3_small'" in message
    assert "missing features.0.0.weight" in message and "unexpected conv1.weight" in message
    assert "more" in message and len(message) < 700


def test_architecture_names_and_weights_resolve_offline():
    assert "torchvision:vit_b_16" not in classification_models() and "vit_b_16" in classification_models()
    assert resolve("torchvision:convnext_tiny").source.startswith("torchvision")
    preset = weights_preset("EfficientNet_B0_Weights.IMAGENET1K_V1")
    assert (preset.resize, preset.crop, preset.interpolation) == (256, 224, "bicubic")
    assert preset.builder == "efficientnet_b0" and len(preset.categories) == 1000
    with pytest.raises(ArchitectureError, match="not an image classifier"):
        weights_preset("FasterRCNN_ResNet50_FPN_Weights.COCO_V1")
    assert isinstance(build(resolve("torchvision:squeezenet1_1"), 3), torch.nn.Module)


def test_a_template_checkpoint_answers_exactly_as_before(client, tiny_checkpoint):
    """The template's checkpoint keeps its stretch preprocessing and its answers."""
    from tests.support import digit_batch, template_probabilities

    state_dict = torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"]
    model = read_model_file(tiny_checkpoint)
    assert model.classifier.input_spec == InputSpec()
    batch = digit_batch(range(5))
    torch.testing.assert_close(model.classifier.forward(batch), template_probabilities(state_dict, batch))


# -- the project's own network, only from modules MODEL_CODE_MODULES allows ----------------------

ACME = textwrap.dedent(
    '''
    """A team's own training package."""
    import pathlib

    import torch
    from torch import nn

    pathlib.Path(__file__).with_name("imported").write_text("imported")  # shows the module ran


    class TinyNet(nn.Module):
        def __init__(self, num_classes, width=8, pool="avg"):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            # view(), not reshape(): the service must not hand such a network channels-last tensors.
            x = self.pool(torch.relu(self.conv(x)))
            return self.head(x.view(x.shape[0], -1))


    def tiny(num_classes, width=8):
        return TinyNet(num_classes, width)

    tiny.__network_builder__ = True


    def helper(num_classes):
        pathlib.Path(__file__).with_name("helper-ran").write_text("ran")
        return TinyNet(num_classes)


    def not_a_network(num_classes):
        return "no"

    not_a_network.__network_builder__ = True


    class Settings:
        def __init__(self, num_classes):
            pathlib.Path(__file__).with_name("settings-ran").write_text("ran")
    '''
)


@pytest.fixture
def own_package(tmp_path, monkeypatch):
    """A project package ``acme_<n>`` with a network module, importable from sys.path."""
    with project_package(tmp_path, monkeypatch, "acme", ACME) as found:
        yield found


def own_network(package, builder="TinyNet", **args):
    """The network a team trained, built from its own package (on sys.path through own_package)."""
    module = importlib.import_module(f"{package.name}.nets")
    torch.manual_seed(0)
    return getattr(module, builder)(len(LABELS), **args).eval()


OWN_INPUT = {"preprocess": {"resize": 72, "crop": 64}, "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3},
             "input_shape": [3, 64, 64], "labels": LABELS}


def test_the_projects_own_network_class_serves_when_its_module_is_allowed(tmp_path, own_package, photo, photo_png):
    name, package = own_package
    net = own_network(package, width=12, pool="max")
    (package / "imported").unlink()
    path = checkpoint(tmp_path / "m.pt", net, architecture=f"{name}.nets:TinyNet",
                      architecture_args={"width": 12, "pool": "max"}, **OWN_INPUT)
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]

    client = create_app({"TESTING": True, "PRED_MODEL_PATH": str(path), "MODEL_CODE_MODULES": (name,)}).test_client()

    served = as_vector(served_probabilities(client, photo_png))
    assert (package / "imported").exists()  # the service imported the module itself
    spec = read_model_file(path, code_modules=(name,)).classifier.input_spec
    # The team's network on the service's preprocessing (the PNG reduced 2x while decoding) ...
    as_decoded = preprocess(decode_image(photo_png, "p.png", 10**8, keep=spec.decode_size()), spec)
    torch.testing.assert_close(served, probabilities(net, as_decoded).double(), atol=1e-6, rtol=0)
    # ... and within a hundredth of the full-size pipeline.
    assert float((served - probabilities(net, preprocess(photo, spec)).double()).abs().max()) <= 0.01


def test_a_marked_builder_function_serves_too(tmp_path, own_package):
    name, package = own_package
    path = checkpoint(tmp_path / "m.pt", own_network(package, "tiny", width=4), architecture=f"{name}.nets:tiny",
                      architecture_args={"width": 4}, **OWN_INPUT)
    model = read_model_file(path, code_modules=(f"{name}.nets",))
    assert model.classifier.module.conv.out_channels == 4


def test_a_module_outside_model_code_modules_is_never_imported(tmp_path, own_package):
    name, package = own_package
    path = checkpoint(tmp_path / "m.pt", own_network(package), architecture=f"{name}.nets:TinyNet", **OWN_INPUT)
    (package / "imported").unlink()
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]

    for allowed in ((), ("other",), (f"{name}.net",), (f"{name}.nets.sub",)):
        message = refusal(path, code_modules=allowed)
        assert "MODEL_CODE_MODULES" in message and f"{name}.nets" in message

    assert not (package / "imported").exists()
    assert f"{name}.nets" not in sys.modules


@pytest.mark.parametrize("builder", ["helper", "not_a_network", "Settings", "pathlib", "torch", "missing"])
def test_inside_an_allowed_module_only_network_classes_and_marked_builders_are_called(tmp_path, own_package, builder):
    name, package = own_package
    path = checkpoint(tmp_path / "m.pt", own_network(package), architecture=f"{name}.nets:{builder}", **OWN_INPUT)
    message = refusal(path, code_modules=(name,))
    if builder == "not_a_network":
        assert "returned a str, not an nn.Module" in message
    else:
        assert "not an nn.Module subclass or a function marked" in message
    assert not (package / "helper-ran").exists() and not (package / "settings-ran").exists()


@pytest.mark.parametrize(
    "architecture", ["os:system", "builtins:eval", "subprocess:run", "posix:system", "importlib:import_module"]
)
@pytest.mark.parametrize("code_modules", [(), ("os", "builtins", "subprocess", "posix", "importlib")])
def test_a_model_file_naming_system_functions_never_runs_them(tmp_path, architecture, code_modules):
    marker = tmp_path / "ran"
    metadata = {**OWN_INPUT, "architecture": architecture,
                "architecture_args": {"args": ["touch", str(marker)], "command": f"touch {marker}"}}
    path = checkpoint(tmp_path / "m.pt", network("squeezenet1_1"), **metadata)
    message = refusal(path, code_modules=code_modules)
    assert "refused" in message
    assert not marker.exists()


def test_model_code_modules_is_read_and_checked_as_module_names():
    assert from_env({"MODEL_CODE_MODULES": " acme.nets , other "}).MODEL_CODE_MODULES == ("acme.nets", "other")
    assert from_env({}).MODEL_CODE_MODULES == ()
    with pytest.raises(ConfigError, match="MODEL_CODE_MODULES: expected comma-separated module names"):
        from_env({"MODEL_CODE_MODULES": "acme/nets"})


# -- rollouts, MLflow, gunicorn and the CLI ----------------------------------------------------------


def test_a_rollout_to_a_version_whose_network_does_not_load_is_refused_and_the_old_one_serves(tmp_path):
    path = checkpoint(tmp_path / "model.pt", network("mobilenet_v3_small"), architecture="torchvision:mobilenet_v3_small",
                      weights="MobileNet_V3_Small_Weights.IMAGENET1K_V1", labels=LABELS)
    registry = ModelRegistry.from_config({"PRED_MODEL_PATH": str(path)})
    before = registry.get()
    for metadata, reason in [
        ({"architecture": "torchvision:resnet19", "labels": LABELS}, "no such torchvision classifier"),
        ({"architecture": "torchvision:mobilenet_v3_small", "weights": "Nope_Weights.X", "labels": LABELS},
         "unknown weights"),
        ({"architecture": "torchvision:mobilenet_v3_small", "labels": LABELS,
          "preprocess": {"resize": 100, "crop": 224}}, "larger than the resize"),
        ({"architecture": "acme.nets:TinyNet", **OWN_INPUT}, "MODEL_CODE_MODULES"),
    ]:
        checkpoint(path, network("mobilenet_v3_small"), **metadata)
        rollout = registry.refresh()
        assert rollout.outcome is Outcome.REFUSED and reason in rollout.reason
        assert registry.get() is before


@pytest.mark.parametrize("options", [{"export_model": True}, {"serialization_format": "pt2"}])
@pytest.mark.filterwarnings("ignore:`export_model` argument is deprecated:FutureWarning")
def test_a_torchvision_network_logged_as_an_mlflow_model_serves_from_its_raw_weights(tmp_path, photo, options):
    import mlflow

    weights = "ResNet18_Weights.IMAGENET1K_V1"
    transform = models.get_weight(weights).transforms()
    net = tempered(network("resnet18"), photo, transform)
    example = transform(photo).unsqueeze(0)
    mlflow.pytorch.save_model(
        net, str(tmp_path / "m"), input_example=example.numpy(),
        metadata={"architecture": "torchvision:resnet18", "weights": weights, "labels": LABELS}, **options,
    )
    model = read_model_file(tmp_path / "m")  # no program may run: ALLOW_MODEL_PROGRAMS is off
    assert isinstance(model.classifier.module, models.ResNet)
    assert model.classifier.input_spec.resize == 256
    torch.testing.assert_close(model.classifier.forward(example)[0], probabilities(net, example[0]), atol=1e-5, rtol=0)


LOGGING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import mlflow, torch
    from torchvision import models

    torch.manual_seed(5)
    net = models.mobilenet_v3_small(num_classes=3).eval()
    metadata = {"architecture": "torchvision:mobilenet_v3_small",
                "weights": "MobileNet_V3_Small_Weights.IMAGENET1K_V1", "labels": ["cat", "dog", "fox"]}
    mlflow.set_experiment("photos")
    with mlflow.start_run() as run:
        logged = mlflow.pytorch.log_model(net, name="photos", input_example=torch.rand(1, 3, 224, 224).numpy(),
                                          metadata=metadata, registered_model_name="photos")
        torch.save({"model_state_dict": net.state_dict(), "metadata": metadata}, "model.pt")
        mlflow.log_artifact("model.pt", artifact_path="model")
    print(json.dumps({"run": run.info.run_id, "model": logged.model_id}))
    """
)


@pytest.mark.slow
def test_a_torchvision_network_from_a_tracking_server_serves_as_plain_weights(tmp_path, photo_png):
    from tests.support import mlflow_server

    with mlflow_server(tmp_path / "mlflow") as url:
        result = subprocess.run(
            [sys.executable, "-c", LOGGING_SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": url},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        ids = json.loads(result.stdout.strip().splitlines()[-1])
        answers = []
        for uri in ("models:/photos/1", f"runs:/{ids['run']}/model"):
            env = {**CLEAN, "MLFLOW_TRACKING_URI": url, "MODELS_DIR": tmp_path / "models", "PRED_MODEL_URI": uri}
            with run_gunicorn(tmp_path, env=env, workers=1) as server:
                version = requests.get(server.url + "/api/v1/model/version", timeout=10).json()["data"]
                assert version["architecture"] == "torchvision:mobilenet_v3_small"
                assert version["input_shape"] == [3, 224, 224] and version["model_uuid"] == ids["run"]
                response = requests.post(server.url + PREDICT, files={"image_file": ("p.png", photo_png)},
                                         params={"top_k": 3}, timeout=30)
                assert response.status_code == 200, response.text
                answers.append(response.json()["data"][0]["top_k"])
    # The logged model (weights read from its torch.export archive) and the run's checkpoint agree.
    assert [a["label"] for a in answers[0]] == [a["label"] for a in answers[1]]
    np.testing.assert_allclose([a["probability"] for a in answers[0]], [a["probability"] for a in answers[1]], atol=1e-6)


@pytest.mark.slow
def test_gunicorn_serves_the_projects_own_network_only_with_model_code_modules(tmp_path, own_package, photo_png):
    name, package = own_package
    path = checkpoint(tmp_path / "m.pt", own_network(package), architecture=f"{name}.nets:TinyNet", **OWN_INPUT)
    env = {**CLEAN, "PRED_MODEL_PATH": path, "PYTHONPATH": package.parent}
    with run_gunicorn(tmp_path, env={**env, "MODEL_CODE_MODULES": name}, workers=1) as server:
        response = requests.post(server.url + PREDICT, files={"image_file": ("p.png", photo_png)}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["prediction"] in LABELS
    with run_gunicorn(tmp_path, env=env, workers=1, ready=False) as server:
        assert server.process.wait(timeout=120) != 0
    assert "MODEL_CODE_MODULES" in server.log() and "Traceback" not in server.log()


@pytest.mark.slow
def test_flask_model_inspect_shows_the_network_its_code_and_preprocessing(tmp_path):
    path = checkpoint(tmp_path / "m.pt", network("efficientnet_b0"), architecture="torchvision:efficientnet_b0",
                      weights="EfficientNet_B0_Weights.IMAGENET1K_V1", labels=LABELS)
    result = flask("model", "inspect", str(path))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["architecture"] == "torchvision:efficientnet_b0" and shown["code"].startswith("torchvision ")
    assert shown["preprocess"]["resize"] == 256 and shown["preprocess"]["crop"] == [224, 224]
    assert shown["preprocess"]["interpolation"] == "bicubic" and shown["label_count"] == 10 and shown["labels"] == LABELS
    assert shown["parameters"] == sum(p.numel() for p in network("efficientnet_b0").parameters())


# -- the README's recipes run as written ------------------------------------------------------------


def readme_recipe(number):
    """The Python block of recipe ``number`` in the README's "Serve your own model"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serve your own model"):]
    recipe = section[section.index(f"**{number}. "):]
    return recipe[recipe.index("```python\n") + len("```python\n"):recipe.index("```\n", recipe.index("```python"))]


def test_the_readme_recipes_for_a_torchvision_network_and_an_own_class_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_recipe(1), "README recipe 1", "exec"), {})
    model = read_model_file(tmp_path / "models" / "pets" / "model" / "model.pt")
    assert model.classifier.labels == ("cat", "dog", "rabbit") and model.classifier.input_spec.resize == 256

    package = tmp_path / "src" / "readme_pets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "networks.py").write_text(readme_recipe(2))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    net = importlib.import_module("readme_pets.networks").PetNet(3, width=32)
    path = checkpoint(
        tmp_path / "own.pt", net, architecture="readme_pets.networks:PetNet", architecture_args={"width": 32},
        labels=["cat", "dog", "rabbit"], preprocess={"resize": 160, "crop": 128},
        normalize={"mean": [0.5] * 3, "std": [0.25] * 3}, input_shape=[3, 128, 128],
    )
    assert read_model_file(path, code_modules=("readme_pets",)).classifier.input_spec.shape == (3, 128, 128)
    for module in [m for m in sys.modules if m.startswith("readme_pets")]:
        del sys.modules[module]


LOAD_MEMORY_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from service.formats import read_model_file

    def status(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak resident size starts again from the current one
    before = status("VmRSS")
    read_model_file(sys.argv[1])
    print((status("VmHWM") - before) / os.path.getsize(sys.argv[1]))
    """
)


def test_a_model_file_is_loaded_without_a_second_copy_in_memory(tmp_path):
    """The weights are read tensor by tensor from the file, not read whole and then deserialised from a copy."""
    path = checkpoint(tmp_path / "m.pt", network("resnet18", classes=1000), architecture="torchvision:resnet18",
                      weights="ResNet18_Weights.IMAGENET1K_V1")
    result = subprocess.run([sys.executable, "-c", LOAD_MEMORY_SCRIPT, str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # The network itself (1x) and its weights as read (1x); reading the bytes first made it 3x or more.
    assert float(result.stdout) < 2.7, f"loading peaked at {float(result.stdout):.2f} x the file's size"


def test_a_project_module_that_exits_on_import_is_refused_and_the_service_goes_on(tmp_path, own_package):
    """An allowed module is the project's own code: even sys.exit() in it is a refusal, not a stop."""
    name, package = own_package
    (package / "quits.py").write_text("import sys\nsys.exit(3)\n")
    path = checkpoint(tmp_path / "m.pt", network("squeezenet1_1"), **{**OWN_INPUT, "architecture": f"{name}.quits:Net"})
    message = refusal(path, code_modules=(name,))
    assert f"cannot import {name}.quits: SystemExit: 3" in message


RECIPE_3_CHECK = textwrap.dedent(
    """
    import sys
    import mlflow
    from service.formats import read_model_file

    exec(compile(sys.stdin.read(), "README recipe 3", "exec"), {})
    folder = mlflow.artifacts.download_artifacts("models:/pets/1", dst_path="downloaded")
    classifier = read_model_file(folder).classifier  # ALLOW_MODEL_PROGRAMS is off: only weights are read
    print(type(classifier.module).__name__, classifier.labels, classifier.input_spec.resize)
    """
)


@pytest.mark.slow
def test_the_readme_recipe_for_a_network_logged_with_mlflow_runs_as_written(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", RECIPE_3_CHECK], input=readme_recipe(3), cwd=tmp_path, capture_output=True,
        text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
             "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ResNet ('cat', 'dog', 'rabbit') 256"
