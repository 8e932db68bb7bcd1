"""A name -> a network, as torchvision's ``get_model`` does it: the one place that turns a model
file's ``architecture`` into code, and the one place that imports code from outside the service.

A model file names its network, it never carries it:

- ``digit_cnn`` (the default): the template's CNN, built in;
- ``torchvision:<name>``: any classification builder of ``torchvision.models`` (``resnet18``,
  ``efficientnet_b0``, ``vit_b_16``...), built with ``weights=None``: nothing is downloaded;
- ``<module>:<name>``: a network class (an ``nn.Module`` subclass) or a function marked with
  :func:`network_builder` in the project's own package, imported only when ``module`` is under a
  prefix the operator lists in ``MODEL_CODE_MODULES``. Anything else is refused before it is
  imported, and nothing but such a class or function is ever called.

Each is called with the metadata's ``architecture_args`` (plain JSON values) and ``num_classes``.
``weights`` names a torchvision weights enum (``ResNet18_Weights.IMAGENET1K_V1``), whose own
description gives the preprocessing and the categories, offline (:func:`weights_preset`).
"""

import functools
import importlib
import math
import re
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision import models as tv_models

# Where an architecture's code comes from.
BUILT_IN, TORCHVISION, PROJECT = "built in", "torchvision", "project"
CODE_MODULES_SETTING = "MODEL_CODE_MODULES"
LIST_COMMAND = "flask --app wsgi model architectures"
_MODULE_NAME = re.compile(r"\A[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")
_ATTRIBUTE = re.compile(r"\A[A-Za-z_]\w*\Z")
# torchvision's builders that are not image classifiers, by the module that holds them.
_OTHER_TASKS = {
    "detection": tv_models.detection,
    "segmentation": tv_models.segmentation,
    "video": tv_models.video,
    "optical flow": tv_models.optical_flow,
    "quantized": tv_models.quantization,
}


class ArchitectureError(ValueError):
    """A model file names a network the service will not build; the message says why in one line."""


class DigitCNN(nn.Module):
    """The template's CNN for 1x28x28 grayscale digits; returns log-probabilities.

    Layer names match the template's checkpoints (and PyTorch's MNIST example), so their
    ``model_state_dict`` loads as it is.
    """

    input_shape = (1, 28, 28)

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


ARCHITECTURES = {"digit_cnn": DigitCNN}


def network_builder(function):
    """Mark a function of the project's own package as one that builds a network.

    Only marked functions (and ``nn.Module`` subclasses) are ever called by name from a model
    file. A package that should not import the service sets ``__network_builder__ = True`` on the
    function itself: it is the same mark.
    """
    function.__network_builder__ = True
    return function


@dataclass(frozen=True)
class Architecture:
    """A network's name resolved to the code that builds it, and where that code comes from."""

    name: str
    builder: object
    kind: str  # BUILT_IN, TORCHVISION or PROJECT
    source: str

    @property
    def known(self):
        """Whether the service knows the network's code (and that it runs on channels-last tensors)."""
        return self.kind != PROJECT


def classification_models():
    """The names of torchvision's classification builders, as ``torchvision:<name>`` takes them."""
    return tv_models.list_models(module=tv_models)


def resolve(name, code_modules=()):
    """The :class:`Architecture` called ``name``; ArchitectureError says in one line why there is none.

    ``code_modules`` are the module prefixes (MODEL_CODE_MODULES) whose networks may be imported;
    any other module is refused before it is imported.
    """
    if not isinstance(name, str) or not name:
        raise ArchitectureError(f"architecture must be a name such as digit_cnn or torchvision:resnet18, got {name!r}")
    if name in ARCHITECTURES:
        return Architecture(name, ARCHITECTURES[name], BUILT_IN, "built in")
    module_name, colon, attribute = name.rpartition(":")
    if not colon:
        raise ArchitectureError(
            f"unknown architecture {name!r}: expected one of {', '.join(sorted(ARCHITECTURES))}, "
            f"torchvision:<name> or <module>:<class>; {LIST_COMMAND} lists them"
        )
    if module_name == TORCHVISION:
        return _torchvision(name, attribute)
    if not _MODULE_NAME.match(module_name) or not _ATTRIBUTE.match(attribute):
        raise ArchitectureError(f"architecture {name[:120]!r} is not <module>:<name> with a dotted module and a plain name")
    return _project(name, module_name, attribute, code_modules)


def _torchvision(name, builder):
    if builder in classification_models():
        return Architecture(name, tv_models.get_model_builder(builder), TORCHVISION, f"torchvision {torchvision.__version__}")
    for task, module in _OTHER_TASKS.items():
        if builder in tv_models.list_models(module=module):
            if module is tv_models.quantization:
                raise ArchitectureError(
                    f"architecture {name!r} is a quantized torchvision classifier, built for int8 inference: "
                    f"serve its float network (torchvision:{builder.removeprefix('quantized_')}) with the float weights"
                )
            raise ArchitectureError(
                f"architecture {name!r} is a torchvision {task} network, not an image classifier; "
                f"{LIST_COMMAND} lists the classifiers"
            )
    raise ArchitectureError(f"unknown architecture {name[:120]!r}: no such torchvision classifier; {LIST_COMMAND} lists them")


def allowed(module_name, code_modules):
    """Whether ``module_name`` is one of ``code_modules`` or inside one of them."""
    return any(module_name == prefix or module_name.startswith(prefix + ".") for prefix in code_modules)


def _project(name, module_name, attribute, code_modules):
    if not allowed(module_name, code_modules):
        raise ArchitectureError(
            f"refused: architecture {name[:120]!r} is code from module {module_name[:80]!r}, which is not imported "
            f"unless {CODE_MODULES_SETTING} lists it or a package above it"
        )
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # the project's own module: any error of its import (even an exit) is its own
        raise ArchitectureError(f"architecture {name!r}: cannot import {module_name}: {exc.__class__.__name__}: {exc}"[:300]) from None
    builder = vars(module).get(attribute)
    is_network_class = isinstance(builder, type) and issubclass(builder, nn.Module)
    is_marked_function = callable(builder) and not isinstance(builder, type) and getattr(builder, "__network_builder__", False) is True
    if not (is_network_class or is_marked_function):
        what = "nothing" if builder is None else f"a {type(builder).__name__}"
        raise ArchitectureError(
            f"refused: {name!r} is {what}, not an nn.Module subclass or a function marked with "
            "@service.architectures.network_builder (or __network_builder__ = True)"
        )
    return Architecture(name, builder, PROJECT, f"module {module_name} ({CODE_MODULES_SETTING})")


def check_arguments(arguments):
    """``architecture_args`` as keyword arguments: a mapping of names to JSON numbers, strings,
    booleans and lists of them; ArchitectureError otherwise."""
    if arguments is None:
        return {}
    if not isinstance(arguments, dict):
        raise ArchitectureError(f"architecture_args must be a mapping of names to values, got {type(arguments).__name__}")
    for key, value in arguments.items():
        if not isinstance(key, str) or not _ATTRIBUTE.match(key):
            raise ArchitectureError(f"architecture_args: {key!r:.60} is not a plain argument name")
        if key == "num_classes":
            raise ArchitectureError("architecture_args: num_classes comes from the number of labels; leave it out")
        if not _plain(value):
            raise ArchitectureError(
                f"architecture_args: {key} must be a JSON number, string, boolean or a list of them, got {value!r:.60}"
            )
    return dict(arguments)


def _plain(value):
    if isinstance(value, bool) or isinstance(value, str) or isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return False


def build(architecture, num_classes, arguments=None):
    """The network ``architecture`` (from :func:`resolve`) with ``num_classes`` outputs, its weights
    not yet loaded.

    Raises ArchitectureError, in one line, for arguments that are not plain JSON values and a
    builder that fails or does not return an ``nn.Module``.
    """
    kwargs = check_arguments(arguments)
    if architecture.kind == TORCHVISION:
        kwargs["weights"] = None  # never download: the model file brings the weights
    try:
        module = architecture.builder(**kwargs, num_classes=num_classes)
    except (Exception, SystemExit) as exc:  # a builder given the wrong arguments, or the project's own code failing
        detail = " ".join(str(exc).split())
        raise ArchitectureError(f"cannot build {architecture.name!r}: {exc.__class__.__name__}: {detail}"[:300]) from None
    if not isinstance(module, nn.Module):
        raise ArchitectureError(f"{architecture.name!r} returned a {type(module).__name__}, not an nn.Module")
    return module


@dataclass(frozen=True)
class WeightsPreset:
    """What a torchvision weights enum says about its inputs and outputs."""

    name: str
    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: tuple[str, ...] | None
    builder: str | None


def weights_preset(name):
    """The preprocessing and categories of the torchvision weights ``name`` (``Enum.member``), offline."""
    if not isinstance(name, str) or name.count(".") != 1:
        raise ArchitectureError(f"weights must name a torchvision weights enum member such as ResNet18_Weights.IMAGENET1K_V1, got {name!r:.80}")
    return _weights_preset(name)


# Loading a model asks for its weights' preset for the labels, the preprocessing and the builder
# check; the answer never changes, and finding the builder walks every torchvision classifier.
@functools.lru_cache(maxsize=64)
def _weights_preset(name):
    try:
        weights = tv_models.get_weight(name)
    except Exception:
        raise ArchitectureError(
            f"unknown weights {name!r:.80}: expected a torchvision weights enum member such as "
            "ResNet18_Weights.IMAGENET1K_V1"
        ) from None
    transforms = weights.transforms()
    if type(transforms).__name__ != "ImageClassification":  # torchvision's preset for classifiers
        raise ArchitectureError(f"weights {name!r} are not an image classifier's ({type(transforms).__name__})")
    categories = weights.meta.get("categories")
    return WeightsPreset(
        name=name,
        resize=int(transforms.resize_size[0]),
        crop=int(transforms.crop_size[0]),
        interpolation=transforms.interpolation.value,
        mean=tuple(float(m) for m in transforms.mean),
        std=tuple(float(s) for s in transforms.std),
        categories=tuple(categories) if categories else None,
        builder=_builder_of(weights),
    )


def _builder_of(weights):
    """The torchvision classifier these weights are for, when one of them names their enum."""
    for builder in classification_models():
        try:
            if tv_models.get_model_weights(builder) is type(weights):
                return builder
        except Exception:  # a builder without weights
            continue
    return None
