"""The module-level model registry: loads the served model once per process and owns it.

Under gunicorn, :meth:`ModelRegistry.load` runs in the master before it forks (the weights are
then shared copy-on-write), and :meth:`ModelRegistry.prepare_worker` runs in each worker after
the fork: thread pools, the device move and the warm-up pass are not fork-safe.
"""

import hashlib
import io
import json
import logging
import re
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from service import architectures
from service.inference import Classifier, InputSpec

log = logging.getLogger(__name__)

TEMPLATE_ARCHITECTURE = "digit_cnn"
TEMPLATE_LABELS = tuple(str(d) for d in range(10))
TORCHSCRIPT_METADATA = "metadata.json"
# Where a run keeps its model, as an MLflow artifact path and under models/<run id>/.
MODEL_ARTIFACT_DIR = "model"
MODEL_FILE = "model.pt"
_MODEL_PATH_LAYOUT = re.compile(r"(?:^|/)models/(?P<uuid>[^/]+)/model/[^/]+$")
_UNPICKLING_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class ModelLoadError(ValueError):
    """The configured model cannot be served; the message names the setting and the problem."""


class ModelNotReady(RuntimeError):
    """The model is loaded but must not serve yet (it failed its start-up parity check)."""


@dataclass(frozen=True)
class ModelSource:
    """Where the served model comes from, as configured."""

    path: str | None = None
    uri: str | None = None
    uuid: str | None = None
    models_dir: str = "models"
    use_cuda: bool = False
    use_mps: bool = False
    verify_on_start: bool = False


def model_uuid_from_path(path):
    """Return ``<uuid>`` for a path laid out as ``models/<uuid>/model/<file>``, else None."""
    match = _MODEL_PATH_LAYOUT.search(Path(path).as_posix())
    return match.group("uuid") if match else None


def select_device(use_cuda, use_mps):
    """Pick CUDA, then MPS, then CPU as allowed and available; return the device and why."""
    if use_cuda:
        if torch.cuda.is_available():
            return torch.device("cuda"), "USE_CUDA is set and CUDA is available"
        reason = "USE_CUDA is set but CUDA is not available"
    else:
        reason = "USE_CUDA is not set"
    if use_mps:
        if torch.backends.mps.is_available():
            return torch.device("mps"), f"{reason}; USE_MPS is set and MPS is available"
        return torch.device("cpu"), f"{reason}; USE_MPS is set but MPS is not available"
    return torch.device("cpu"), f"{reason}; USE_MPS is not set"


def _error_detail(exc):
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


def _input_spec(metadata):
    shape = metadata.get("input_shape", (1, 28, 28))
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise ValueError(f"input_shape must be [channels (1 or 3), height, width], got {shape!r}")
    normalize = metadata.get("normalize") or {}
    mean, std = normalize.get("mean"), normalize.get("std")
    if (mean is None) != (std is None):
        raise ValueError("normalize needs both mean and std")
    if mean is not None:
        if len(mean) != shape[0] or len(std) != shape[0] or any(s == 0 for s in std):
            raise ValueError(f"normalize mean and std need {shape[0]} values each, std non-zero")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return InputSpec(int(shape[0]), int(shape[1]), int(shape[2]), mean, std)


def _labels(metadata):
    labels = metadata.get("labels", TEMPLATE_LABELS)
    if not labels or not all(isinstance(label, (str, int)) for label in labels):
        raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
    return tuple(str(label) for label in labels)


def _load_torchscript(data):
    extra = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but is a format this service serves: no warning per start.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    if not extra[TORCHSCRIPT_METADATA]:
        raise ValueError(f"TorchScript archive has no {TORCHSCRIPT_METADATA} with labels and input_shape")
    metadata = json.loads(extra[TORCHSCRIPT_METADATA])
    if "labels" not in metadata or "input_shape" not in metadata:
        raise ValueError(f"TorchScript {TORCHSCRIPT_METADATA} must give labels and input_shape")
    metadata.setdefault("architecture", f"torchscript:{module.original_name}")
    return module, metadata


def _load_checkpoint(data):
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        # weights_only refuses any global it does not know: that is the point.
        refused = _UNPICKLING_GLOBAL.search(str(exc))
        if refused:
            raise ValueError(
                f"refused: the file is not a plain weights file and loading it would need arbitrary "
                f"unpickling (it references {refused.group(1)})"
            ) from None
        raise ValueError(
            f"not a model file: neither a TorchScript archive nor a PyTorch weights file, or it is corrupt "
            f"({_error_detail(exc)})"
        ) from None
    if isinstance(checkpoint, dict) and "model_state_dict" in checkpoint:
        state_dict, metadata = checkpoint["model_state_dict"], checkpoint.get("metadata") or {}
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict, metadata = checkpoint, {}
    else:
        raise ValueError(
            "unrecognised checkpoint: expected a state_dict, a dict with 'model_state_dict' "
            "(and optional 'metadata'), or a TorchScript archive"
        )
    if not isinstance(metadata, dict):
        raise ValueError("the checkpoint's 'metadata' must be a dict")
    metadata.setdefault("architecture", TEMPLATE_ARCHITECTURE)
    module = architectures.build(metadata["architecture"], num_classes=len(_labels(metadata)))
    fixed_shape = getattr(module, "input_shape", None)
    if fixed_shape is not None:
        # A network with a fixed input size fails on any other only at its first forward pass,
        # which under gunicorn is the worker's warm-up: say so now, in one line.
        shape = metadata.setdefault("input_shape", list(fixed_shape))
        if not isinstance(shape, (list, tuple)) or list(shape) != list(fixed_shape):
            raise ValueError(
                f"input_shape {shape!r} does not fit architecture {metadata['architecture']!r}, "
                f"which takes {list(fixed_shape)}"
            )
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"weights do not fit architecture {metadata['architecture']!r}: {detail[:300]}") from None
    # Channels-last weights make CPU convolutions and pooling faster (a fifth of a one-image
    # forward pass), with results equal up to float rounding. Only for our own architectures,
    # which reshape rather than view their activations; a TorchScript model is left as it is.
    module.to(memory_format=torch.channels_last)
    return module, metadata


def read_model(data):
    """Build a CPU :class:`Classifier` and its metadata from the bytes of a model file.

    Raises ValueError, saying why in one line, for anything that is not a model it can serve.
    """
    if not data:
        raise ValueError("the file is empty")
    try:
        module, metadata = _load_torchscript(data) if _is_torchscript(data) else _load_checkpoint(data)
        module.eval()
        return Classifier(module, _labels(metadata), _input_spec(metadata)), metadata
    except ValueError:
        raise
    except Exception as exc:  # torch and TorchScript raise many types for malformed archives
        raise ValueError(f"cannot load model: {_error_detail(exc)}") from None


class ModelRegistry:
    """Holds the one model this process serves, with its provenance and readiness."""

    def __init__(self):
        self._lock = threading.Lock()
        self.source = ModelSource()
        self._reset()

    def _reset(self):
        self.classifier = None
        self.info = {}
        self.prepared = False
        self.problem = "no model loaded yet"

    @property
    def ready(self):
        """True once this process has loaded and warmed up the model and it passed its checks."""
        return self.prepared and self.problem is None

    def configure(self, config):
        """Take the model settings from an app's config; forget a model loaded for other settings."""
        path = config.get("PRED_MODEL_PATH")
        source = ModelSource(
            path=path,
            uri=config.get("PRED_MODEL_URI"),
            uuid=config.get("PRED_MODEL_UUID") or (path and model_uuid_from_path(path)),
            models_dir=config.get("MODELS_DIR", "models"),
            use_cuda=config.get("USE_CUDA", False),
            use_mps=config.get("USE_MPS", False),
            verify_on_start=config.get("VERIFY_MODEL_ON_START", False),
        )
        with self._lock:
            if source != self.source:
                self.source = source
                self._reset()

    def load(self):
        """Load the configured model on the CPU; raise ModelLoadError naming the setting at fault."""
        with self._lock:
            if self.classifier is None:
                try:
                    self._load()
                except ModelLoadError as exc:
                    self.problem = str(exc)  # what /health/ready reports
                    raise
        return self.classifier

    def _resolve(self):
        """Return (path, setting name, provenance) for the configured source, fetching it if remote."""
        if self.source.path:
            return Path(self.source.path), "PRED_MODEL_PATH", {"model_uuid": self.source.uuid}
        if self.source.uri:
            from service import mlflow_store

            try:
                fetched = mlflow_store.fetch_model_uri(self.source.uri, self.source.models_dir)
            except mlflow_store.FetchError as exc:
                raise ModelLoadError(f"PRED_MODEL_URI: {exc}") from None
            provenance = {
                "model_uuid": self.source.uuid or fetched.run_id,
                "model_uri": self.source.uri,
                "model_name": fetched.model_name,
                "model_version": fetched.model_version,
            }
            return Path(fetched.path), "PRED_MODEL_URI", provenance
        raise ModelLoadError("PRED_MODEL_PATH: not set (nor PRED_MODEL_URI): no model to serve")

    def _load(self):
        path, setting, provenance = self._resolve()
        started = time.perf_counter()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelLoadError(f"{setting}: {path} does not exist") from None
        except IsADirectoryError:
            raise ModelLoadError(f"{setting}: {path} is a directory, expected a model file") from None
        except OSError as exc:
            raise ModelLoadError(f"{setting}: cannot read {path}: {exc.strerror}") from None
        try:
            classifier, metadata = read_model(data)
        except ValueError as exc:
            raise ModelLoadError(f"{setting}: {path}: {exc}") from None
        self.classifier = classifier
        self.info = {
            **provenance,
            "model_path": str(path),
            "sha256": hashlib.sha256(data).hexdigest(),
            "architecture": metadata["architecture"],
            "labels": list(classifier.labels),
            "input_shape": list(classifier.input_spec.shape),
            "device": "cpu",
            "loaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.problem = "the model is loaded but this worker has not warmed it up yet"
        log.info(
            "loaded %s (%s, sha256 %s) in %.1f ms",
            path, metadata["architecture"], self.info["sha256"][:12], (time.perf_counter() - started) * 1000,
        )

    def prepare_worker(self, threads=None):
        """In a serving process: set torch threads, move the model to its device, warm it up."""
        if threads:
            torch.set_num_threads(threads)
        classifier = self.load()
        with self._lock:
            if self.prepared:
                return classifier
            device, why = select_device(self.source.use_cuda, self.source.use_mps)
            log.info("serving on %s: %s; %d torch thread(s)", device, why, torch.get_num_threads())
            started = time.perf_counter()
            try:
                classifier.module.to(device)
                classifier.device = device
                self.info["device"] = str(device)
                classifier.warm_up()
            except Exception as exc:
                # e.g. metadata giving an input size the network does not take, or a device out of memory
                setting = "PRED_MODEL_PATH" if self.source.path else "PRED_MODEL_URI"
                self.problem = (
                    f"{setting}: {self.info.get('model_path')}: the warm-up forward pass on a "
                    f"{list(classifier.input_spec.shape)} input on {device} failed ({_error_detail(exc)})"
                )
                raise ModelLoadError(self.problem) from None
            log.info("warm-up forward pass took %.1f ms", (time.perf_counter() - started) * 1000)
            self.problem = self._verify(classifier)
            self.prepared = True
        return classifier

    def _verify(self, classifier):
        """With VERIFY_MODEL_ON_START, return why the model fails its parity check (None if it passes)."""
        if not self.source.verify_on_start:
            return None
        from service import verify

        try:
            report = verify.verify_classifier(classifier, self.info.get("model_uuid"))
        except Exception as exc:  # a check that cannot run has not passed; the worker stays unready
            log.exception("parity check could not run")
            return f"parity check could not run: {_error_detail(exc)}"
        if report.ok:
            log.info("parity check passed: %s", report.summary)
            return None
        log.error("parity check failed: %s", report.summary)
        return f"parity check failed: {report.summary}"

    def get(self):
        """Return the ready classifier, loading and warming it up in this process if need be.

        Raises ModelLoadError when the model cannot be loaded, ModelNotReady when it failed a check.
        """
        if not self.prepared:
            self.prepare_worker()
        if self.problem is not None:
            raise ModelNotReady(self.problem)
        return self.classifier


registry = ModelRegistry()
