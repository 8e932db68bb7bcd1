"""Training the digit CNN on scikit-learn's bundled handwritten digits, and logging it to MLflow.

Each 8x8 digit becomes the 8-bit grayscale image a client would send, and goes through
:func:`service.preprocess.preprocess`, the very function that prepares uploads for the served
model: the network learns from exactly what it will be shown. Nothing is downloaded.
"""

import contextlib
import io
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm import tqdm

from service.architectures import DigitCNN
from service.preprocess import InputSpec, preprocess
from service.formats import MODEL_ARTIFACT_DIR, MODEL_FILE, TEMPLATE_ARCHITECTURE, TEMPLATE_LABELS

log = logging.getLogger(__name__)

ARCHITECTURE = TEMPLATE_ARCHITECTURE
LABELS = TEMPLATE_LABELS
INPUT_SPEC = InputSpec(channels=1, height=28, width=28)
DATASET = "sklearn.datasets.load_digits"
DEFAULT_EXPERIMENT = "digit-classifier"
CHECKPOINT_NAME = MODEL_FILE
CONFUSION_MATRIX = "confusion_matrix.png"
SAMPLE_PREDICTIONS = "sample_predictions.png"
# The network as an MLflow model (mlflow.pytorch.log_model), beside the template's model/model.pt.
LOGGED_MODEL_NAME = "classifier"
# MLflow 3's UI opens an experiment with this tag as model training, not as a GenAI experiment.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_EVAL_BATCH = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; each field is logged as an MLflow parameter."""

    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 0.002
    seed: int = 0
    split_seed: int = 0
    test_fraction: float = 0.2
    rotation_degrees: float = 10.0
    shift_pixels: float = 2.0
    scale_jitter: float = 0.1
    train_limit: int | None = None  # train on the first N training digits only (quick checks)

    def params(self):
        """The parameters to log: every field, and what the run is made of."""
        return {
            **asdict(self),
            "architecture": ARCHITECTURE,
            "dataset": DATASET,
            "optimiser": "Adam",
            "lr_schedule": "cosine",
            "input_shape": list(INPUT_SPEC.shape),
        }


@dataclass(frozen=True)
class DigitSplit:
    """scikit-learn's digits (8x8, values 0..16) and a stratified training / held-out split of them."""

    images: np.ndarray
    targets: np.ndarray
    train: np.ndarray
    test: np.ndarray


def split_digits(split_seed=TrainConfig.split_seed, test_fraction=TrainConfig.test_fraction):
    """Split the bundled digits into training and held-out indices; the same seed gives the same split."""
    # scikit-learn and matplotlib load here, not with the module: the CLI imports this module.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(
        indices, test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )
    return DigitSplit(digits.images, digits.target, train, test)


def digit_image(pixels):
    """An 8x8 digit (values 0..16) as the white-on-black 8-bit grayscale image a client would send."""
    scaled = np.round(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))


def held_out_digits(split_seed=TrainConfig.split_seed, test_fraction=TrainConfig.test_fraction):
    """The held-out digits of a split, as (image, label) pairs."""
    split = split_digits(split_seed, test_fraction)
    return [(digit_image(split.images[i]), LABELS[split.targets[i]]) for i in split.test]


def write_held_out_digit(path, label):
    """Write the first held-out digit ``label`` (one the demo model never trained on) to ``path`` as a
    PNG, as a client would send it; return the path."""
    image = next(image for image, target in held_out_digits() if target == label)
    image.save(path, format="PNG")
    return path


def _tensors(images):
    """Turn 8x8 digits into the Nx1x28x28 batch the service would make of them."""
    return torch.stack([preprocess(digit_image(pixels), INPUT_SPEC) for pixels in images])


def augment(batch, generator, config):
    """Rotate, scale and shift each image a little, with a fresh draw per image (from ``generator``)."""
    n = batch.shape[0]

    def uniform(*shape):
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = uniform(n) * math.radians(config.rotation_degrees)
    scale = 1 + uniform(n) * config.scale_jitter
    # affine_grid coordinates span 2 units per image side
    shift = uniform(n, 2) * (2 * config.shift_pixels / batch.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class TrainedModel:
    """A trained network with its optimiser, per-epoch history and held-out results."""

    model: DigitCNN
    optimiser: torch.optim.Optimizer
    config: TrainConfig
    history: list
    split: DigitSplit
    test_predictions: np.ndarray

    @property
    def final(self):
        return self.history[-1]

    @property
    def test_accuracy(self):
        return self.final["test_accuracy"]

    def checkpoint(self):
        """The checkpoint the service's registry reads: weights, metadata, optimiser and losses."""
        return {
            "epoch": self.config.epochs,
            "model_state_dict": self.model.state_dict(),
            "optimiser_state_dict": self.optimiser.state_dict(),
            "train_loss": self.final["train_loss"],
            "test_loss": self.final["test_loss"],
            "test_accuracy": self.test_accuracy,
            "metadata": {
                "architecture": ARCHITECTURE,
                "input_shape": list(INPUT_SPEC.shape),
                "normalize": None,
                "polarity": INPUT_SPEC.polarity,
                "labels": list(LABELS),
            },
        }

    def save(self, path):
        """Write the checkpoint to ``path`` (folders made as needed) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.checkpoint(), path)
        return path


def _evaluate(model, x, y):
    """Mean loss, accuracy and predicted classes of ``model`` (in eval mode) on a batch."""
    model.eval()
    with torch.inference_mode():
        outputs = torch.cat([model(x[i : i + _EVAL_BATCH]) for i in range(0, len(x), _EVAL_BATCH)])
    predictions = outputs.argmax(dim=1)
    loss = F.nll_loss(outputs, y).item()
    return loss, (predictions == y).float().mean().item(), predictions.numpy()


def fit(config=TrainConfig(), on_epoch=None, progress=True):
    """Train the digit CNN as ``config`` says and return it; no MLflow involved.

    The same config gives the same weights on the same machine: one seed drives the
    initialisation, shuffling, augmentation and dropout, and deterministic algorithms are on for
    the duration. ``on_epoch(epoch, metrics)`` is called after each epoch.
    """
    split = split_digits(config.split_seed, config.test_fraction)
    train_indices = split.train[: config.train_limit] if config.train_limit else split.train
    x_train, y_train = _tensors(split.images[train_indices]), torch.from_numpy(split.targets[train_indices])
    x_test, y_test = _tensors(split.images[split.test]), torch.from_numpy(split.targets[split.test])
    batches = math.ceil(len(x_train) / config.batch_size)
    history = []
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            generator = torch.Generator().manual_seed(config.seed)
            model = DigitCNN(num_classes=len(LABELS))
            optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs)
            bar = tqdm(total=config.epochs * batches, desc="training", unit="batch", disable=not progress)
            with bar:
                for epoch in range(1, config.epochs + 1):
                    model.train()
                    order = torch.randperm(len(x_train), generator=generator)
                    loss_sum, correct = 0.0, 0
                    for start in range(0, len(order), config.batch_size):
                        index = order[start : start + config.batch_size]
                        inputs = augment(x_train[index], generator, config)
                        optimiser.zero_grad()
                        outputs = model(inputs)
                        loss = F.nll_loss(outputs, y_train[index])
                        loss.backward()
                        optimiser.step()
                        loss_sum += loss.item() * len(index)
                        correct += (outputs.argmax(dim=1) == y_train[index]).sum().item()
                        bar.update()
                    schedule.step()
                    test_loss, test_accuracy, predictions = _evaluate(model, x_test, y_test)
                    metrics = {
                        "train_loss": loss_sum / len(x_train),
                        "train_accuracy": correct / len(x_train),
                        "test_loss": test_loss,
                        "test_accuracy": test_accuracy,
                    }
                    history.append(metrics)
                    bar.set_postfix(epoch=epoch, loss=f"{metrics['train_loss']:.3f}", test_acc=f"{test_accuracy:.2%}")
                    if on_epoch:
                        on_epoch(epoch, metrics)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
    return TrainedModel(model, optimiser, config, history, split, predictions)


def confusion_matrix_png(targets, predictions):
    """A confusion-matrix plot of held-out results, as PNG bytes."""
    from matplotlib.figure import Figure
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(targets, predictions, labels=range(len(LABELS)))
    figure = Figure(figsize=(6, 5.5), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set(
        xticks=range(len(LABELS)), yticks=range(len(LABELS)), xticklabels=LABELS, yticklabels=LABELS,
        xlabel="predicted", ylabel="true",
        title=f"held-out digits: {np.trace(matrix)}/{matrix.sum()} correct",
    )
    threshold = matrix.max() / 2
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if count > threshold else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    return _png(figure)


def sample_predictions_png(images, targets, predictions, count=32):
    """A grid of held-out digits titled with their true and predicted labels (mistakes first, in red)."""
    from matplotlib.figure import Figure

    wrong = [i for i in range(len(targets)) if targets[i] != predictions[i]]
    right = [i for i in range(len(targets)) if targets[i] == predictions[i]]
    chosen = (wrong[: count // 2] + right)[:count]
    columns = 8
    rows = max(1, math.ceil(len(chosen) / columns))
    figure = Figure(figsize=(columns * 1.1, rows * 1.3), dpi=100)
    for position, i in enumerate(chosen, start=1):
        axes = figure.add_subplot(rows, columns, position)
        axes.imshow(images[i], cmap="gray", vmin=0, vmax=16)
        axes.set_title(
            f"{LABELS[targets[i]]} → {LABELS[predictions[i]]}",
            color="black" if targets[i] == predictions[i] else "red", fontsize=9,
        )
        axes.axis("off")
    figure.suptitle("held-out digits: true → predicted")
    return _png(figure)


def _png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


@dataclass(frozen=True)
class LoggedRun:
    """A finished MLflow run of :func:`train_and_log`."""

    run_id: str
    test_accuracy: float
    model_name: str | None = None
    model_version: str | None = None
    model_id: str | None = None


def _experiment_id(client, name):
    """The id of experiment ``name``, created if need be."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"experiment {name!r} is deleted: restore it in the MLflow UI or pick another name")
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def installable_version(version):
    """``version`` as a package index serves it: without a local label such as ``+cu130`` or ``+cpu``,
    which names one build of a wheel index and that no plain index (PyPI, a mirror) has."""
    from packaging.version import Version

    return Version(str(version)).public


def log_network(tracking, run_id, trained, examples):
    """Log the trained network to run ``run_id`` with ``mlflow.pytorch.log_model`` (torch.export
    format, signature and input example from ``examples``, an Nx1x28x28 batch with N > 1 so the batch
    size stays free) and return the logged model's id. Its metadata names the architecture, so the
    service reads it as plain weights."""
    import mlflow
    from mlflow.environment_variables import MLFLOW_TRACKING_URI
    from mlflow.models import infer_signature

    model = trained.model.eval()
    example = examples.numpy()
    with torch.inference_mode():
        output = model(examples).numpy()
    # log_model needs MLflow's global tracking URI; put it back as it was (None: unset) afterwards.
    previous = MLFLOW_TRACKING_URI.get_raw() if MLFLOW_TRACKING_URI.is_set() else None
    mlflow.set_tracking_uri(tracking.uri)
    try:
        # MLflow prints the run's links on stdout; stdout is for the run id alone (scripts read it).
        with contextlib.redirect_stdout(sys.stderr), mlflow.start_run(run_id=run_id):
            logged = mlflow.pytorch.log_model(
                model, name=LOGGED_MODEL_NAME, input_example=example, signature=infer_signature(example, output),
                metadata=trained.checkpoint()["metadata"], serialization_format="pt2",
                # Named, not inferred: inferring loads the model in a child process, for seconds.
                pip_requirements=[f"torch=={installable_version(torch.__version__)}"],
            )
    finally:
        mlflow.set_tracking_uri(previous)
    return logged.model_id


def register(client, run_id, name, alias=None):
    """Register ``runs:/<run_id>/model`` as a new version of model ``name``, with ``alias`` if given."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}", run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    log.info("registered run %s as version %s of %s%s", run_id, version.version, name, f" @{alias}" if alias else "")
    return version


def train_and_log(
    config=TrainConfig(), tracking=None, experiment=DEFAULT_EXPERIMENT, register_name=None, alias=None, tags=None,
    progress=True,
):
    """Train as :func:`fit` does, logging params, per-epoch metrics, checkpoint and plots to an MLflow run.

    ``tracking`` is a :class:`service.mlflow_store.Tracking` (default: MLflow's configured server).
    Optionally registers the model as ``register_name`` and points ``alias`` at that version.
    """
    from mlflow.entities import Metric, Param

    from service import mlflow_store

    tracking = tracking or mlflow_store.connect(create=True)  # training may start a new local store
    client = tracking.client
    run = client.create_run(
        _experiment_id(client, experiment),
        run_name=f"{ARCHITECTURE}-seed{config.seed}",
        tags={"architecture": ARCHITECTURE, "dataset": DATASET, **(tags or {})},
    )
    run_id = run.info.run_id
    log.info("training run %s in experiment %r on %s", run_id, experiment, tracking.shown)
    status = "FAILED"
    try:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in config.params().items()])

        def on_epoch(epoch, metrics):
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])

        started = time.perf_counter()
        trained = fit(config, on_epoch, progress)
        seconds = time.perf_counter() - started
        client.log_metric(run_id, "training_seconds", seconds)
        test_images = trained.split.images[trained.split.test]
        test_targets = trained.split.targets[trained.split.test]
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            checkpoint = trained.save(folder / MODEL_ARTIFACT_DIR / CHECKPOINT_NAME)
            client.log_artifact(run_id, str(checkpoint), MODEL_ARTIFACT_DIR)
            (folder / CONFUSION_MATRIX).write_bytes(confusion_matrix_png(test_targets, trained.test_predictions))
            (folder / SAMPLE_PREDICTIONS).write_bytes(
                sample_predictions_png(test_images, test_targets, trained.test_predictions)
            )
            client.log_artifact(run_id, str(folder / CONFUSION_MATRIX))
            client.log_artifact(run_id, str(folder / SAMPLE_PREDICTIONS))
        model_id = log_network(tracking, run_id, trained, _tensors(test_images[:4]))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        # MLflow prints the run's links on stdout; stdout is for the run id alone (scripts read it).
        with contextlib.redirect_stdout(sys.stderr):
            client.set_terminated(run_id, status)
    log.info(
        "run %s: test accuracy %.2f%% after %d epochs in %.1f s",
        run_id, trained.test_accuracy * 100, config.epochs, seconds,
    )
    version = register(client, run_id, register_name, alias) if register_name else None
    return LoggedRun(
        run_id, trained.test_accuracy, register_name, str(version.version) if version else None, model_id
    )
