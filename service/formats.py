"""Model files -> a CPU :class:`~service.inference.Classifier` and its metadata (no Flask, no MLflow).

Formats read, in the order they are recognised:

- TorchScript archives with a ``metadata.json`` extra file (a *program*: see below);
- the project's own checkpoint and the template's: ``{"model_state_dict": ..., "metadata": {...}}``;
- a bare ``state_dict`` (the template's architecture and labels).

Trust model: a checkpoint or a state_dict is plain weights, read with
``torch.load(weights_only=True)``, which refuses anything that would need arbitrary unpickling.
A TorchScript archive is a program: its ``forward()`` runs whatever code was compiled into it
(file access included). Programs are served only when ``allow_programs`` is set
(``ALLOW_MODEL_PROGRAMS``).
"""

import hashlib
import io
import json
import os
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from config.settings import Settings
from service import architectures
from service.inference import Classifier, InputSpec

TEMPLATE_ARCHITECTURE = "digit_cnn"
TEMPLATE_LABELS = tuple(str(d) for d in range(10))
TORCHSCRIPT_METADATA = "metadata.json"
# Where a run keeps its model, as an MLflow artifact path and under models/<run id>/.
MODEL_ARTIFACT_DIR = "model"
MODEL_FILE = "model.pt"
_MODEL_PATH_LAYOUT = re.compile(r"(?:^|/)models/(?P<uuid>[^/]+)/model/[^/]+$")
_UNPICKLING_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_PROGRAMS_SETTING = "ALLOW_MODEL_PROGRAMS"


class ModelFileError(ValueError):
    """A file is not a model this service can serve; the message says why in one line."""


@dataclass(frozen=True)
class ModelFile:
    """A model read from a file: the classifier (on the CPU), its metadata and the file's identity."""

    classifier: Classifier
    metadata: dict
    sha256: str
    size: int


def model_uuid_from_path(path):
    """Return ``<uuid>`` for a path laid out as ``models/<uuid>/model/<file>``, else None."""
    match = _MODEL_PATH_LAYOUT.search(Path(path).as_posix())
    return match.group("uuid") if match else None


def error_detail(exc):
    """The telling line of a torch error (they come with advice paragraphs and interpreter traces)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marker in ("WeightsUnpickler error:", "Unpickler error:"):
        for i, line in enumerate(lines[:-1]):
            if line.endswith(marker):
                return f"{exc.__class__.__name__}: {lines[i + 1]}"[:300]
    if not lines:
        return exc.__class__.__name__
    # TorchScript errors end with the original exception; others state it first.
    line = lines[-1] if "Traceback of TorchScript" in str(exc) else f"{exc.__class__.__name__}: {lines[0]}"
    return line[:300]


def _is_torchscript(data):
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return any("/code/" in name or name.endswith("constants.pkl") for name in names)


def input_spec(metadata):
    """The :class:`InputSpec` a model's metadata describes (``input_shape``, ``normalize``)."""
    shape = metadata.get("input_shape", (1, 28, 28))
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise ModelFileError(f"input_shape must be [channels (1 or 3), height, width], got {shape!r}")
    normalize = metadata.get("normalize") or {}
    mean, std = normalize.get("mean"), normalize.get("std")
    if (mean is None) != (std is None):
        raise ModelFileError("normalize needs both mean and std")
    if mean is not None:
        if len(mean) != shape[0] or len(std) != shape[0] or any(s == 0 for s in std):
            raise ModelFileError(f"normalize mean and std need {shape[0]} values each, std non-zero")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return InputSpec(int(shape[0]), int(shape[1]), int(shape[2]), mean, std)


def labels_of(metadata):
    """The labels a model's metadata lists (the template's digits when it lists none)."""
    labels = metadata.get("labels", TEMPLATE_LABELS)
    if not labels or not all(isinstance(label, (str, int)) for label in labels):
        raise ModelFileError(f"labels must be a non-empty list of strings, got {labels!r}")
    return tuple(str(label) for label in labels)


def _load_torchscript(data):
    extra = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but is a format this service serves: no warning per start.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    if not extra[TORCHSCRIPT_METADATA]:
        raise ModelFileError(f"TorchScript archive has no {TORCHSCRIPT_METADATA} with labels and input_shape")
    metadata = json.loads(extra[TORCHSCRIPT_METADATA])
    if "labels" not in metadata or "input_shape" not in metadata:
        raise ModelFileError(f"TorchScript {TORCHSCRIPT_METADATA} must give labels and input_shape")
    metadata.setdefault("architecture", f"torchscript:{module.original_name}")
    return module, metadata


def _load_checkpoint(data):
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        # weights_only refuses any global it does not know: that is the point.
        refused = _UNPICKLING_GLOBAL.search(str(exc))
        if refused:
            raise ModelFileError(
                f"refused: the file is not a plain weights file and loading it would need arbitrary "
                f"unpickling (it references {refused.group(1)})"
            ) from None
        raise ModelFileError(
            f"not a model file: neither a TorchScript archive nor a PyTorch weights file, or it is corrupt "
            f"({error_detail(exc)})"
        ) from None
    if isinstance(checkpoint, dict) and "model_state_dict" in checkpoint:
        state_dict, metadata = checkpoint["model_state_dict"], checkpoint.get("metadata") or {}
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict, metadata = checkpoint, {}
    else:
        raise ModelFileError(
            "unrecognised checkpoint: expected a state_dict, a dict with 'model_state_dict' "
            "(and optional 'metadata'), or a TorchScript archive"
        )
    if not isinstance(metadata, dict):
        raise ModelFileError("the checkpoint's 'metadata' must be a dict")
    metadata.setdefault("architecture", TEMPLATE_ARCHITECTURE)
    try:
        module = architectures.build(metadata["architecture"], num_classes=len(labels_of(metadata)))
    except ValueError as exc:
        raise ModelFileError(str(exc)) from None
    fixed_shape = getattr(module, "input_shape", None)
    if fixed_shape is not None:
        # A network with a fixed input size fails on any other only at its first forward pass,
        # which under gunicorn is the worker's warm-up: say so now, in one line.
        shape = metadata.setdefault("input_shape", list(fixed_shape))
        if not isinstance(shape, (list, tuple)) or list(shape) != list(fixed_shape):
            raise ModelFileError(
                f"input_shape {shape!r} does not fit architecture {metadata['architecture']!r}, "
                f"which takes {list(fixed_shape)}"
            )
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModelFileError(
            f"weights do not fit architecture {metadata['architecture']!r}: {detail[:300]}"
        ) from None
    # Channels-last weights make CPU convolutions and pooling faster (a fifth of a one-image
    # forward pass), with results equal up to float rounding. Only for our own architectures,
    # which reshape rather than view their activations; a TorchScript model is left as it is.
    module.to(memory_format=torch.channels_last)
    return module, metadata


def read_model(data, allow_programs=False):
    """Build a CPU :class:`Classifier` and its metadata from the bytes of a model file.

    Raises ModelFileError, saying why in one line, for anything that is not a model it can
    serve, and for a program (TorchScript) unless ``allow_programs``.
    """
    if not data:
        raise ModelFileError("the file is empty")
    try:
        if _is_torchscript(data):
            if not allow_programs:
                raise ModelFileError(
                    f"refused: a TorchScript archive is a program that runs its own code when called; "
                    f"set {_PROGRAMS_SETTING}=1 to serve programs you trust"
                )
            module, metadata = _load_torchscript(data)
        else:
            module, metadata = _load_checkpoint(data)
        module.eval()
        return Classifier(module, labels_of(metadata), input_spec(metadata)), metadata
    except ModelFileError:
        raise
    except Exception as exc:  # torch and TorchScript raise many types for malformed archives
        raise ModelFileError(f"cannot load model: {error_detail(exc)}") from None


def read_bytes(path, max_size=Settings.MAX_MODEL_FILE_SIZE):
    """The bytes of the regular file ``path``, at most ``max_size`` of them.

    A FIFO, a device or a socket is refused before it is opened (reading one could block for
    ever or never end), and so is a file over ``max_size`` (MAX_MODEL_FILE_SIZE).
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ModelFileError(f"{path} does not exist") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ModelFileError(f"{path} is a directory, expected a model file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"{path} is not a regular file (a FIFO, device or socket), expected a model file")
    if info.st_size > max_size:
        raise ModelFileError(
            f"{path} is {info.st_size} bytes, over the limit of {max_size} (MAX_MODEL_FILE_SIZE)"
        )
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the check, open() must not hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise ModelFileError(f"{path} is not a regular file, expected a model file")
            data = file.read(max_size + 1)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > max_size:
        raise ModelFileError(f"{path} grew over the limit of {max_size} bytes (MAX_MODEL_FILE_SIZE)")
    return data


def read_model_file(path, allow_programs=False, max_size=Settings.MAX_MODEL_FILE_SIZE):
    """Read the model file at ``path`` into a :class:`ModelFile`; ModelFileError says why not."""
    data = read_bytes(path, max_size)
    try:
        classifier, metadata = read_model(data, allow_programs)
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    return ModelFile(classifier, metadata, hashlib.sha256(data).hexdigest(), len(data))
