"""Parity check: the held-out digits, sent as PNG like a client sends them, must score what training logged.

The digits go through the service's own decoding, preprocessing and classifier, as uploads do; a
served model whose weights, labels or preprocessing differ from the trained one (train/serve skew)
scores differently from the ``test_accuracy`` logged on its MLflow run.
"""

import contextlib
import io
import logging
from dataclasses import dataclass

from config.settings import Settings
from service.training import TrainConfig, held_out_digits

log = logging.getLogger(__name__)

TOLERANCE_POINTS = 1.0
_BATCH = 64


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of a parity check: whether it passed and a one-line summary.

    ``ran`` is False when the check could not run for now (the tracking server could not be
    reached): not a verdict on the model, and worth running again.
    """

    ok: bool
    summary: str
    accuracy: float | None = None
    expected: float | None = None
    count: int = 0
    ran: bool = True


def held_out_pngs(split_seed=TrainConfig.split_seed, test_fraction=TrainConfig.test_fraction):
    """The held-out digits of a training split as (filename, PNG bytes, label), as a client sends them."""
    pngs = []
    for i, (image, label) in enumerate(held_out_digits(split_seed, test_fraction)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append((f"held-out-{i:04d}.png", buffer.getvalue(), label))
    return pngs


def measure(classifier, split_seed=TrainConfig.split_seed, test_fraction=TrainConfig.test_fraction):
    """Return (accuracy, count) of ``classifier`` on the held-out digits sent through the service's decoder."""
    pngs = held_out_pngs(split_seed, test_fraction)
    correct = 0
    for start in range(0, len(pngs), _BATCH):
        chunk = pngs[start : start + _BATCH]
        # The very calls the predict endpoint makes for an upload and for a request.
        tensors = [classifier.prepare(data, name, Settings.MAX_IMAGE_PIXELS) for name, data, _ in chunk]
        predictions = classifier.classify(tensors)
        correct += sum(p.label == label for p, (_, _, label) in zip(predictions, chunk))
    return correct / len(pngs), len(pngs)


def check(
    classifier,
    expected,
    split_seed=TrainConfig.split_seed,
    test_fraction=TrainConfig.test_fraction,
    source="training",
    tolerance=TOLERANCE_POINTS,
):
    """Compare the classifier's held-out accuracy with ``expected`` (0..1); within ``tolerance`` points passes."""
    accuracy, count = measure(classifier, split_seed, test_fraction)
    apart = abs(accuracy - expected) * 100
    measured = f"accuracy {accuracy:.2%} on {count} held-out digits sent as PNG"
    if apart <= tolerance:
        summary = f"{measured}; {source} logged {expected:.2%} (within {tolerance:g} point)"
        return VerifyReport(True, summary, accuracy, expected, count)
    summary = (
        f"{measured}, but {source} logged {expected:.2%}: {apart:.1f} points apart (more than {tolerance:g}); "
        "the served model, its labels or its preprocessing differ from the trained ones"
    )
    return VerifyReport(False, summary, accuracy, expected, count)


def verify_classifier(classifier, run_id, tracking=None, torch_lock=None):
    """Check ``classifier`` against the ``test_accuracy`` logged on MLflow run ``run_id``.

    A missing run id, an unknown run or a run not logged by ``flask model train`` is a failed
    check, with its reason in the summary; an unreachable server is a check that could not run
    (``ran`` False). ``torch_lock`` is held around the forward passes only, never while the
    tracking server is asked.
    """
    from service import mlflow_store

    if not run_id:
        return VerifyReport(
            False,
            "no MLflow run id to compare with: the model is not at models/<run_id>/model/<file> "
            "and PRED_MODEL_UUID is not set",
        )
    try:
        # connect() and get_run() turn every failure (a server, a local store, a bad id) into FetchError.
        tracking = tracking or mlflow_store.connect()
        run = mlflow_store.get_run(tracking, run_id)
    except mlflow_store.FetchError as exc:
        return VerifyReport(False, f"cannot read the accuracy logged on run {run_id}: {exc}", ran=exc.permanent)
    metrics, params = run.data.metrics, run.data.params
    missing = [name for name in ("test_accuracy",) if name not in metrics]
    missing += [name for name in ("split_seed", "test_fraction") if name not in params]
    if missing:
        return VerifyReport(
            False, f"run {run_id} has no {', '.join(missing)}: it was not logged by `flask model train`"
        )
    try:
        split_seed, test_fraction = int(params["split_seed"]), float(params["test_fraction"])
    except ValueError:
        return VerifyReport(False, f"run {run_id} has unreadable split parameters {params['split_seed']!r}, "
                                   f"{params['test_fraction']!r}")
    with torch_lock or contextlib.nullcontext():
        return check(classifier, metrics["test_accuracy"], split_seed, test_fraction, source=f"run {run_id}")
