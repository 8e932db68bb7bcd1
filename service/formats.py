"""Model files -> a CPU :class:`~service.inference.Classifier` and its metadata (no Flask, no MLflow).

Formats read, in the order they are recognised:

- TorchScript archives with a ``metadata.json`` extra file (a *program*: see below);
- the project's own checkpoint and the template's: ``{"model_state_dict": ..., "metadata": {...}}``;
- a bare ``state_dict`` (the template's architecture and labels);
- an MLflow model directory (``MLmodel`` and ``data/``) written by ``mlflow.pytorch.log_model`` or
  ``save_model`` with MLflow 3's ``torch.export`` format (``data/model.pt2``).

Trust model: a checkpoint or a state_dict is plain weights, read with
``torch.load(weights_only=True)``, which refuses anything that would need arbitrary unpickling.
A TorchScript archive is a program: its ``forward()`` runs whatever code was compiled into it
(file access included). Programs are served only when ``allow_programs`` is set
(``ALLOW_MODEL_PROGRAMS``). A ``torch.export`` archive is a program too, and ``torch.export.load``
unpickles parts of it: when the MLmodel's ``metadata`` names one of :mod:`service.architectures`,
only its raw weight tensors are read, into that architecture, and no code from the archive runs;
otherwise it is loaded as a program. A pickled ``nn.Module`` (``data/model.pth``) is always refused.
"""

import hashlib
import io
import json
import os
import re
import stat
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from config.settings import Settings
from service import architectures
from service.inference import Classifier
from service.preprocess import INTERPOLATIONS, POLARITIES, InputSpec

TEMPLATE_ARCHITECTURE = "digit_cnn"
TEMPLATE_LABELS = tuple(str(d) for d in range(10))
TORCHSCRIPT_METADATA = "metadata.json"
# Where a run keeps its model, as an MLflow artifact path and under models/<run id>/.
MODEL_ARTIFACT_DIR = "model"
MODEL_FILE = "model.pt"
_MODEL_PATH_LAYOUT = re.compile(r"(?:^|/)models/(?P<uuid>[^/]+)/model/[^/]+$")
_UNPICKLING_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_PROGRAMS_SETTING = "ALLOW_MODEL_PROGRAMS"
MLMODEL = "MLmodel"
_EXPORTED_FILE = "model.pt2"
_PICKLED_FILE = "model.pth"
# torch.export's serialized dtypes (torch/_export/serde/schema.py ScalarType) that weights may have.
_EXPORT_DTYPES = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
    7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16,
}


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


def _source(data):
    """A model file's bytes, or its open file rewound, as torch and zipfile read them."""
    if isinstance(data, (bytes, bytearray)):
        return io.BytesIO(data)
    data.seek(0)
    return data


def _is_torchscript(data):
    try:
        with zipfile.ZipFile(_source(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return any("/code/" in name or name.endswith("constants.pkl") for name in names)


def _positive(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelFileError(f"{what} must be a positive whole number, got {value!r:.60}")
    return value


def _preprocessing(metadata):
    """``(resize, crop (height, width), interpolation, preset)`` from ``preprocess`` or ``weights``;
    ``resize`` is None for the template's stretch."""
    preset = None
    if metadata.get("weights") is not None:
        try:
            preset = architectures.weights_preset(metadata["weights"])
        except architectures.ArchitectureError as exc:
            raise ModelFileError(str(exc)) from None
    steps = metadata.get("preprocess")
    if steps is None:
        if preset is None:
            return None, None, "bilinear", None
        return preset.resize, (preset.crop, preset.crop), preset.interpolation, preset
    if not isinstance(steps, dict):
        raise ModelFileError(f"preprocess must be a mapping such as {{\"resize\": 256, \"crop\": 224}}, got {steps!r:.80}")
    unknown = sorted(set(steps) - {"resize", "crop", "interpolation"})
    if unknown:
        raise ModelFileError(f"preprocess: unknown step(s) {', '.join(map(str, unknown))}; it takes resize, crop and interpolation")
    resize = _positive(steps.get("resize", preset.resize if preset else None), "preprocess resize (the shorter side)")
    crop = steps.get("crop", preset.crop if preset else resize)
    crop = tuple(crop) if isinstance(crop, (list, tuple)) and len(crop) == 2 else (crop, crop)
    crop = tuple(_positive(side, "preprocess crop") for side in crop)
    if max(crop) > resize:
        raise ModelFileError(f"preprocess: the crop {crop[0]}x{crop[1]} is larger than the resize {resize}")
    interpolation = steps.get("interpolation", preset.interpolation if preset else "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ModelFileError(f"preprocess interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r:.40}")
    return resize, crop, interpolation, preset


def input_spec(metadata):
    """The :class:`InputSpec` a model's metadata describes: ``input_shape``, ``normalize``, ``polarity``,
    and ``preprocess`` or ``weights`` (a torchvision weights enum's own resize, crop and normalisation)."""
    resize, crop, interpolation, preset = _preprocessing(metadata)
    default_shape = (1, 28, 28) if crop is None else (3, *crop)
    shape = metadata.get("input_shape", default_shape)
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise ModelFileError(f"input_shape must be [channels (1 or 3), height, width], got {shape!r}")
    if crop is not None and tuple(shape[1:]) != tuple(crop):
        raise ModelFileError(f"input_shape {list(shape)} does not fit the preprocessing's crop {list(crop)}")
    normalize = metadata.get("normalize") or {}
    if not normalize and preset is not None and shape[0] == 3:
        normalize = {"mean": preset.mean, "std": preset.std}
    mean, std = normalize.get("mean"), normalize.get("std")
    if (mean is None) != (std is None):
        raise ModelFileError("normalize needs both mean and std")
    if mean is not None:
        if len(mean) != shape[0] or len(std) != shape[0] or any(s == 0 for s in std):
            raise ModelFileError(f"normalize mean and std need {shape[0]} values each, std non-zero")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    polarity = metadata.get("polarity")  # unset: InputSpec's default for the channel count
    if polarity is not None and polarity not in POLARITIES:
        raise ModelFileError(f"polarity must be one of {', '.join(POLARITIES)}, got {polarity!r}")
    return InputSpec(int(shape[0]), int(shape[1]), int(shape[2]), mean, std, polarity, resize, interpolation)


def labels_of(metadata):
    """The labels a model's metadata lists; else its torchvision weights' categories; else, for the
    template's network, the digits."""
    labels = metadata.get("labels")
    if labels is None and metadata.get("weights") is not None:
        try:
            labels = architectures.weights_preset(metadata["weights"]).categories
        except architectures.ArchitectureError as exc:
            raise ModelFileError(str(exc)) from None
    if labels is None:
        if metadata.get("architecture", TEMPLATE_ARCHITECTURE) != TEMPLATE_ARCHITECTURE:
            raise ModelFileError(
                f"give the labels of architecture {metadata['architecture']!r} in the metadata's labels "
                "(or weights whose categories they are)"
            )
        labels = TEMPLATE_LABELS
    if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(label, (str, int)) for label in labels):
        raise ModelFileError(f"labels must be a non-empty list of strings, got {labels!r:.120}")
    return tuple(str(label) for label in labels)


def _load_torchscript(data):
    extra = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but is a format this service serves: no warning per start.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        module = torch.jit.load(_source(data), map_location="cpu", _extra_files=extra)
    if not extra[TORCHSCRIPT_METADATA]:
        raise ModelFileError(f"TorchScript archive has no {TORCHSCRIPT_METADATA} with labels and input_shape")
    metadata = json.loads(extra[TORCHSCRIPT_METADATA])
    if "labels" not in metadata or "input_shape" not in metadata:
        raise ModelFileError(f"TorchScript {TORCHSCRIPT_METADATA} must give labels and input_shape")
    metadata.setdefault("architecture", f"torchscript:{module.original_name}")
    return module, metadata


def _load_checkpoint(data, code_modules=()):
    try:
        checkpoint = torch.load(_source(data), map_location="cpu", weights_only=True)
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
    return _build(state_dict, metadata, code_modules), metadata


def _build(state_dict, metadata, code_modules=()):
    """The architecture ``metadata`` names, with ``state_dict`` loaded into it."""
    name = metadata["architecture"]
    try:
        architecture = architectures.resolve(name, code_modules)
        labels = labels_of(metadata)
        module = architectures.build(architecture, len(labels), metadata.get("architecture_args"))
        if architecture.kind == architectures.TORCHVISION:
            builder = architectures.weights_preset(metadata["weights"]).builder if metadata.get("weights") else None
            if builder is not None and f"{architectures.TORCHVISION}:{builder}" != name:
                raise architectures.ArchitectureError(
                    f"weights {metadata['weights']!r} are torchvision:{builder}'s, not {name!r}'s"
                )
            if not any(key in metadata for key in ("weights", "preprocess", "input_shape")):
                raise architectures.ArchitectureError(
                    f"{name!r} needs its input described: give weights (a torchvision weights enum member) "
                    "or preprocess with normalize and input_shape"
                )
    except architectures.ArchitectureError as exc:
        raise ModelFileError(str(exc)) from None
    fixed_shape = getattr(module, "input_shape", None)
    if fixed_shape is not None:
        # A network with a fixed input size fails on any other only at its first forward pass,
        # which under gunicorn is the worker's warm-up: say so now, in one line.
        shape = metadata.setdefault("input_shape", list(fixed_shape))
        if not isinstance(shape, (list, tuple)) or list(shape) != list(fixed_shape):
            raise ModelFileError(
                f"input_shape {shape!r} does not fit architecture {name!r}, which takes {list(fixed_shape)}"
            )
    _check_fit(module, state_dict, name, len(labels))
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModelFileError(f"weights do not fit architecture {name!r}: {detail[:300]}") from None
    if architecture.known:
        # Channels-last weights make CPU convolutions and pooling faster (a fifth to a third of a
        # forward pass), with results equal up to float rounding. Only for the networks the
        # service knows: every torchvision classifier runs on channels-last activations (checked
        # for all of them), while the project's own may view() theirs, which such strides forbid.
        module.to(memory_format=torch.channels_last)
    return module


def _check_fit(module, state_dict, name, classes):
    """Say in one line how ``state_dict`` does not fit ``module``: the labels' count against the
    output layer, or the first keys that are missing, unexpected or of another shape."""
    expected = module.state_dict()
    shapes = {key: tuple(value.shape) for key, value in expected.items()}
    wrong = [
        key for key, value in state_dict.items()
        if key in shapes and isinstance(value, torch.Tensor) and tuple(value.shape) != shapes[key]
    ]
    outputs = [
        key for key in wrong
        if shapes[key][:1] == (classes,) and state_dict[key].shape[1:] == torch.Size(shapes[key][1:])
    ]
    if wrong and outputs == wrong:
        found = state_dict[outputs[0]].shape[0]
        raise ModelFileError(
            f"the model has {classes} labels but the weights of {name!r} give {found} outputs "
            f"({outputs[0]} is {list(state_dict[outputs[0]].shape)}): list {found} labels"
        )
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {_first(unexpected)}")
        if wrong:
            parts.append("of another shape " + _first([f"{key} {list(state_dict[key].shape)} (expected {list(shapes[key])})" for key in wrong]))
        raise ModelFileError(
            f"weights do not fit architecture {name!r} (a state_dict of another network?): " + "; ".join(parts)
        )


def _first(keys, shown=3):
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(str(key)[:120] for key in keys[:shown]) + more


def read_model(data, allow_programs=False, code_modules=()):
    """Build a CPU :class:`Classifier` and its metadata from the bytes of a model file, or from the
    open file itself (read tensor by tensor, never held whole).

    Raises ModelFileError, saying why in one line, for anything that is not a model it can
    serve, and for a program (TorchScript) unless ``allow_programs``. A network from the project's
    own modules is built only when ``code_modules`` (MODEL_CODE_MODULES) allows its module.
    """
    if not data if isinstance(data, (bytes, bytearray)) else not os.fstat(data.fileno()).st_size:
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
            module, metadata = _load_checkpoint(data, code_modules)
        module.eval()
        return Classifier(module, labels_of(metadata), input_spec(metadata)), metadata
    except ModelFileError:
        raise
    except Exception as exc:  # torch and TorchScript raise many types for malformed archives
        raise ModelFileError(f"cannot load model: {error_detail(exc)}") from None


@contextmanager
def _open_regular(path, max_size):
    """The regular file ``path`` opened for reading, once it is known to be at most ``max_size``.

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
        file = os.fdopen(fd, "rb")
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from None
    with file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ModelFileError(f"{path} is not a regular file, expected a model file")
        yield file


def _read_all(file, path, max_size, chunk=None):
    """Read ``file`` whole (``chunk`` None) or hash it in chunks; ModelFileError when it grew over ``max_size``."""
    digest, data, total = hashlib.sha256(), [], 0
    try:
        while piece := file.read(chunk or max_size + 1):
            total += len(piece)
            if total > max_size:
                raise ModelFileError(f"{path} grew over the limit of {max_size} bytes (MAX_MODEL_FILE_SIZE)")
            digest.update(piece)
            if chunk is None:
                data.append(piece)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from None
    return b"".join(data), digest.hexdigest(), total


def read_bytes(path, max_size=Settings.MAX_MODEL_FILE_SIZE):
    """The bytes of the regular file ``path``, at most ``max_size`` (MAX_MODEL_FILE_SIZE) of them."""
    with _open_regular(path, max_size) as file:
        return _read_all(file, path, max_size)[0]


def file_sha256(path, max_size=Settings.MAX_MODEL_FILE_SIZE):
    """The SHA-256 :func:`read_model_file` gives the model at ``path``, without building the model:
    what tells an unchanged version. A file is hashed in chunks, never held whole."""
    if Path(path).is_dir():
        return directory_sha256(read_directory(path, max_size))
    with _open_regular(path, max_size) as file:
        return _read_all(file, path, max_size, chunk=1 << 20)[1]


def read_model_file(path, allow_programs=False, max_size=Settings.MAX_MODEL_FILE_SIZE, code_modules=()):
    """Read the model file, or MLflow model directory, at ``path`` into a :class:`ModelFile`;
    ModelFileError says why not. A directory's sha256 covers the names and contents of its files.

    A file is hashed in chunks and then loaded from the same open file, tensor by tensor: what is
    loaded is what was hashed, and loading holds no second copy of the file in memory.
    """
    if Path(path).is_dir():
        files = read_directory(path, max_size)
        try:
            classifier, metadata = read_mlflow_model(files, allow_programs, code_modules)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        return ModelFile(classifier, metadata, directory_sha256(files), sum(len(data) for data in files.values()))
    with _open_regular(path, max_size) as file:
        _, sha256, size = _read_all(file, path, max_size, chunk=1 << 20)
        try:
            classifier, metadata = read_model(file, allow_programs, code_modules)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
    return ModelFile(classifier, metadata, sha256, size)


# -- MLflow model directories (mlflow.pytorch.log_model / save_model) ------------------------------


class ExportedProgram(torch.nn.Module):
    """A ``torch.export`` program as a module; one exported for a fixed batch size runs in chunks of it."""

    def __init__(self, program, batch=None):
        super().__init__()
        self.program, self.batch = program, batch

    def train(self, mode=True):
        # An exported graph has no train/eval switch (it raises): it runs as it was exported.
        self.training = mode
        return self

    def forward(self, x):
        if self.batch is None or x.shape[0] == self.batch:
            return self.program(x)
        chunks = list(x.split(self.batch))
        short = self.batch - chunks[-1].shape[0]
        if short:
            chunks[-1] = torch.cat([chunks[-1], chunks[-1].new_zeros((short, *x.shape[1:]))])
        return torch.cat([self.program(chunk) for chunk in chunks])[: x.shape[0]]


def read_directory(path, max_size=Settings.MAX_MODEL_FILE_SIZE):
    """Every file under the directory ``path``, by relative POSIX name; at most ``max_size`` bytes in all.

    Only regular files and folders: a symbolic link, a FIFO or a device is refused.
    """
    path = Path(path)
    if not (path / MLMODEL).is_file():
        raise ModelFileError(f"{path} is a directory without an {MLMODEL} file: expected a model file or an MLflow model")
    files, total = {}, 0
    for root, folders, names in os.walk(path):
        folders.sort()
        for name in folders + names:
            if (Path(root) / name).is_symlink():
                raise ModelFileError(f"{Path(root) / name} is a symbolic link: an MLflow model holds plain files only")
        for name in sorted(names):
            full = Path(root) / name
            data = read_bytes(full, max(0, max_size - total))
            total += len(data)
            files[full.relative_to(path).as_posix()] = data
    return files


def directory_sha256(files):
    """A SHA-256 over a directory's file names and contents (as :func:`read_directory` returns them)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "little"))
        digest.update(files[name])
    return digest.hexdigest()


def _tensor_shapes(signature, key):
    """The shapes of the tensors in an MLmodel signature's ``inputs`` or ``outputs`` ([] if none)."""
    text = signature.get(key) if isinstance(signature, dict) else None
    if not text:
        return []
    try:
        specs = json.loads(text)
    except ValueError:
        raise ModelFileError(f"the {MLMODEL} signature's {key} are not valid JSON") from None
    shapes = []
    for spec in specs if isinstance(specs, list) else []:
        tensor = spec.get("tensor-spec") if isinstance(spec, dict) and spec.get("type") == "tensor" else None
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise ModelFileError(f"the {MLMODEL} signature's {key} must be tensors, got {spec!r:.120}")
        shapes.append(shape)
    return shapes


def _mlflow_metadata(mlmodel):
    """The metadata the registry needs, from the MLmodel's ``metadata`` and its signature."""
    metadata = mlmodel.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(f"the {MLMODEL} metadata must be a mapping")
    metadata = dict(metadata)
    inputs = _tensor_shapes(mlmodel.get("signature"), "inputs")
    outputs = _tensor_shapes(mlmodel.get("signature"), "outputs")
    if "input_shape" not in metadata and inputs:
        if len(inputs) != 1 or len(inputs[0]) != 4:
            raise ModelFileError(
                f"the {MLMODEL} signature must have one input tensor [batch, channels, height, width], got {inputs}"
            )
        metadata["input_shape"] = inputs[0][1:]
    if "labels" not in metadata and len(outputs) == 1 and len(outputs[0]) == 2 and outputs[0][1] > 0:
        metadata["labels"] = [str(i) for i in range(outputs[0][1])]
    return metadata


def _weights_of_export(data, name):
    """The weights of a ``torch.export`` archive as a state_dict, read as raw tensors: nothing in the
    archive is unpickled but by ``torch.load(weights_only=True)``, and none of its code runs."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ModelFileError(f"{name} is not a torch.export archive (not a zip file)") from None
    with archive:
        names = set(archive.namelist())
        config_suffix = "data/weights/model_weights_config.json"
        config_name = next((n for n in sorted(names) if n.endswith(config_suffix)), None)
        if config_name is None:
            raise ModelFileError(f"{name} has no {config_suffix} (saved by a torch older than 2.7?)")
        root = config_name[: -len(config_suffix)]
        byteorder = f"{root}byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise ModelFileError(f"{name} holds big-endian weights")
        entries = json.loads(archive.read(config_name)).get("config") or {}
        state_dict = {}
        for key, entry in entries.items():
            member = f"{root}data/weights/{entry['path_name']}"
            if "/" in entry["path_name"] or member not in names:
                raise ModelFileError(f"{name}: weight {key!r} points at a missing file {entry['path_name']!r}")
            raw = archive.read(member)
            if entry.get("use_pickle"):
                tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
                if not isinstance(tensor, torch.Tensor):
                    raise ModelFileError(f"{name}: weight {key!r} is not a tensor")
            else:
                tensor = _raw_tensor(raw, entry["tensor_meta"], f"{name}: weight {key!r}")
            state_dict[key] = tensor
    return state_dict


def _raw_tensor(raw, meta, what):
    dtype = _EXPORT_DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise ModelFileError(f"{what} has an unsupported dtype ({meta.get('dtype')!r})")
    sizes = [d["as_int"] for d in meta["sizes"]]
    strides = [d["as_int"] for d in meta["strides"]]
    offset = meta["storage_offset"]["as_int"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) % itemsize or len(sizes) != len(strides) or min([offset, *sizes, *strides], default=0) < 0:
        raise ModelFileError(f"{what}: its size, shape or strides do not fit its data")
    storage = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    last = offset + sum((n - 1) * s for n, s in zip(sizes, strides)) if all(sizes) else -1
    if last >= storage.numel():
        raise ModelFileError(f"{what}: its shape {sizes} reaches past its {storage.numel()} stored values")
    return torch.as_strided(storage, sizes, strides, offset).clone()


def _load_export_program(data, name):
    """A ``torch.export`` archive loaded as a program (it may unpickle: trusted files only)."""
    program = torch.export.load(io.BytesIO(data)).module()
    inputs = [node for node in program.graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        raise ModelFileError(f"{name} takes {len(inputs)} inputs; a classifier takes one image batch")
    value = inputs[0].meta.get("val")
    batch = value.shape[0] if value is not None and isinstance(value.shape[0], int) else None
    return ExportedProgram(program, batch)


def read_mlflow_model(files, allow_programs=False, code_modules=()):
    """Build a CPU :class:`Classifier` and its metadata from an MLflow model directory's files.

    Reads ``mlflow.pytorch``'s ``torch.export`` format (``data/model.pt2``): as plain weights when
    the MLmodel's ``metadata`` names an architecture of :mod:`service.architectures`, else as a
    program (``allow_programs`` only). The input shape comes from the signature (or metadata
    ``input_shape``), the labels from metadata ``labels``, else ``0..N-1`` for N outputs. A pickled
    ``nn.Module`` (``data/model.pth``) is refused.
    """
    try:
        mlmodel = yaml.safe_load(files[MLMODEL])
    except yaml.YAMLError as exc:
        raise ModelFileError(f"{MLMODEL} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(mlmodel, dict):
        raise ModelFileError(f"{MLMODEL} is not a mapping")
    flavors = mlmodel.get("flavors") or {}
    flavor = flavors.get("pytorch") if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict):
        raise ModelFileError(
            f"the MLflow model has no pytorch flavor (it has {', '.join(map(str, flavors)) or 'none'}): "
            "log it with mlflow.pytorch.log_model"
        )
    data_dir = str(flavor.get("model_data") or "data").strip("/")
    exported, pickled = files.get(f"{data_dir}/{_EXPORTED_FILE}"), files.get(f"{data_dir}/{_PICKLED_FILE}")
    if exported is None:
        if pickled is not None:
            raise ModelFileError(
                f"refused: {data_dir}/{_PICKLED_FILE} is a pickled nn.Module (serialization_format='pickle'), "
                "and loading it would run arbitrary code: log the model with serialization_format='pt2' "
                "(MLflow 3's default) instead"
            )
        raise ModelFileError(f"the MLflow model has no {data_dir}/{_EXPORTED_FILE}")
    name = f"{data_dir}/{_EXPORTED_FILE}"
    metadata = _mlflow_metadata(mlmodel)
    try:
        if metadata.get("architecture") is not None:
            if "labels" not in metadata and metadata.get("weights") is None:
                raise ModelFileError("give labels in the logged model's metadata, or an output signature [-1, classes]")
            module = _build(_weights_of_export(exported, name), metadata, code_modules)
            module.eval()
        elif not allow_programs:
            raise ModelFileError(
                f"refused: {name} is a torch.export program that runs its own graph, and loading it unpickles "
                f"parts of it; set {_PROGRAMS_SETTING}=1 to serve programs you trust, or name its architecture "
                "(digit_cnn, torchvision:<name> or <module>:<class>) in the logged model's metadata to load its "
                "weights only"
            )
        else:
            if "input_shape" not in metadata:
                raise ModelFileError(f"{name}: the MLflow model needs a signature giving its input shape")
            module = _load_export_program(exported, name)
            metadata.setdefault("architecture", "torch.export")
            if "labels" not in metadata:
                classes = module(torch.zeros((1, *metadata["input_shape"]))).shape[-1]
                metadata["labels"] = [str(i) for i in range(classes)]
        return Classifier(module, labels_of(metadata), input_spec(metadata)), metadata
    except ModelFileError:
        raise
    except Exception as exc:  # torch raises many types for malformed archives
        raise ModelFileError(f"cannot load {name}: {error_detail(exc)}") from None
