"""Inference engines: what runs a network's forward pass on the CPU.

- ``torch``: the network itself, eager PyTorch.
- ``onnxruntime``: the same network exported to ONNX (``torch.onnx.export``, a dynamic batch
  dimension) and run by ONNX Runtime, two to three times faster on the CPU for the same answers.

:func:`choose` decides once per model version, where the model is loaded (the gunicorn master,
before it forks): it exports the network the service built itself (never a program from a model
file), runs the export next to eager PyTorch on a blank batch and on a batch of the largest size
a request may send, and keeps the export only when every probability agrees within
:data:`TOLERANCE`. Each serving process then builds its own :class:`OnnxRunner` from the exported
bytes (ONNX Runtime's thread pools, like torch's, do not survive a fork).

Like :mod:`service.inference`, this module knows neither a web framework nor MLflow.
"""

import contextlib
import ctypes
import ctypes.util
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# ONNX Runtime's official Linux builds send usage telemetry, with a device id kept in a file in
# TMPDIR, unless this is set before it is first imported: a model server does not phone home.
# An operator who wants it sets ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

log = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

AUTO, TORCH, ONNXRUNTIME = "auto", "torch", "onnxruntime"
ENGINES = (AUTO, TORCH, ONNXRUNTIME)
SETTING = "INFERENCE_ENGINE"
# The largest difference of any probability between the engines that still counts as the same answer.
TOLERANCE = 1e-5
# Opset 17 for torch's TorchScript-based exporter, 18 (its own) for the torch.export-based one.
OPSET, DYNAMO_OPSET = 17, 18
# Architectures that are programs in the model file: run as they are, by PyTorch.
PROGRAM_PREFIXES = ("torchscript:", "torch.export")


class EngineError(RuntimeError):
    """A network cannot run on ONNX Runtime with the same answers; the message says why in one line."""


@dataclass(frozen=True)
class Choice:
    """The engine a model version runs on: its name, the ONNX export when it is ONNX Runtime, and why."""

    engine: str
    reason: str
    onnx: bytes | None = None
    max_difference: float | None = None


def choose(classifier, architecture, setting=AUTO, max_batch=1, device="cpu"):
    """The engine that runs ``classifier`` (built from ``architecture``) under INFERENCE_ENGINE ``setting``.

    ``auto`` exports and checks, and falls back to PyTorch (saying why) when that fails;
    ``onnxruntime`` raises EngineError instead; ``torch`` never exports. Programs, and any device
    other than the CPU, run on PyTorch. ``max_batch`` is the largest batch a request can make (MAX_FILES).
    """
    if setting not in ENGINES:
        raise EngineError(f"{SETTING}: expected one of {', '.join(ENGINES)}, got {setting!r}")
    if setting == TORCH:
        return Choice(TORCH, f"{SETTING}=torch")
    why_not = None
    if str(device) != "cpu":
        why_not = f"ONNX Runtime serves the CPU only (the model runs on {device})"
    elif architecture.startswith(PROGRAM_PREFIXES):
        why_not = "the model file is a program, which PyTorch runs as it is"
    if why_not is None:
        try:
            onnx, difference = export_checked(classifier, max_batch)
        except EngineError as exc:
            why_not = str(exc)
        else:
            return Choice(ONNXRUNTIME, f"same answers as PyTorch within {difference:.0e}", onnx, difference)
        finally:
            release_free_memory()  # the exporter's and the checking session's transient copies, either way
    if setting == ONNXRUNTIME:
        raise EngineError(f"{SETTING}=onnxruntime: {why_not}")
    return Choice(TORCH, why_not)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a requirement, missing only from a hand-made environment
        raise EngineError(f"onnxruntime cannot be imported ({exc}): pip install -r requirements.txt") from None
    return onnxruntime


def export(module, input_shape):
    """``module`` (in eval mode, on the CPU) as ONNX bytes taking an ``input`` of N x ``input_shape``.

    TorchScript's exporter first (a fraction of a second for most networks); torch.export's
    (``dynamo=True``) for what it cannot trace, such as the fused attention of vision transformers.
    """
    example = (torch.zeros((2, *input_shape)),)
    common = {"input_names": ["input"], "output_names": ["output"], "verbose": False}
    attempts = [
        {"dynamo": False, "opset_version": OPSET, "dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}},
        {"dynamo": True, "opset_version": DYNAMO_OPSET, "optimize": True,
         "dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=4096)},)},
    ]
    for options in attempts:
        buffer = io.BytesIO()
        try:
            # The exporters print their notes and, on failure, whole graphs: not the operator's business.
            with _quiet(), torch.inference_mode(False), torch.no_grad():
                torch.onnx.export(module, example, buffer, **common, **options)
            return buffer.getvalue()
        except Exception as exc:  # the exporters raise many kinds: an operator with no ONNX, a trace that fails
            text = _ANSI.sub("", str(exc)).strip()
            problem = f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
    raise EngineError(f"the network cannot be exported to ONNX ({problem})")


@contextlib.contextmanager
def _quiet():
    """Keep the exporters' printed notes, warnings and log lines (whole graphs, on a failure) out of
    the service's output: the one line that matters is the EngineError, or the choice logged."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch.onnx", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (AttributeError, OSError):
        return None


_TRIM = _malloc_trim()


def release_free_memory():
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Building an ONNX Runtime session goes through two to three transient copies of the weights
    (the parsed model, its initializers, their re-laid-out forms), which glibc keeps as free heap
    instead of returning them: a worker's session of resnet18 (45 MiB of weights) held 142 MiB of
    its memory, 52 MiB once trimmed.
    """
    if _TRIM is not None:
        _TRIM(0)


class OnnxRunner:
    """An ONNX Runtime session of one process: call it with an NxCxHxW batch, get the network's outputs."""

    def __init__(self, onnx, threads=1):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads or 1))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EngineError(f"ONNX Runtime cannot run the export ({str(exc).strip()[:200]})") from None
        self.input = self.session.get_inputs()[0].name
        release_free_memory()

    def __call__(self, batch):
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])


def export_checked(classifier, max_batch=1):
    """Export ``classifier``'s network and check it against eager PyTorch: a blank image (the
    warm-up batch) and a batch of ``max_batch`` seeded random images, every probability within
    TOLERANCE. Returns (the ONNX bytes, the largest difference); raises EngineError."""
    module, shape = classifier.module, tuple(classifier.input_spec.shape)
    onnx = export(module, shape)
    runner = OnnxRunner(onnx, threads=torch.get_num_threads())
    generator = torch.Generator().manual_seed(0)
    batches = [torch.zeros((1, *shape)), torch.rand((max(1, max_batch), *shape), generator=generator)]
    difference = 0.0
    for batch in batches:
        with torch.inference_mode():
            expected = torch.softmax(module(batch).float(), dim=1)
        try:
            got = torch.softmax(runner(batch).float(), dim=1)
        except Exception as exc:
            raise EngineError(f"ONNX Runtime failed on a batch of {len(batch)} ({str(exc).strip()[:200]})") from None
        if got.shape != expected.shape:
            raise EngineError(f"ONNX Runtime answered {list(got.shape)} where PyTorch answers {list(expected.shape)}")
        difference = max(difference, float((got - expected).abs().max()))
        if not difference <= TOLERANCE:  # also NaN
            raise EngineError(
                f"ONNX Runtime's probabilities differ from PyTorch's by {difference:.1e} on a batch of {len(batch)} "
                f"(more than {TOLERANCE:.0e})"
            )
    return onnx, difference
