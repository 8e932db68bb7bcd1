"""Training: determinism, the checkpoint the registry reads, accuracy, and no train/serve drift."""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from service.images import decode_image
from service.preprocess import InputSpec, preprocess
from service.formats import read_model
from service.training import (
    LABELS,
    TrainConfig,
    confusion_matrix_png,
    digit_image,
    fit,
    split_digits,
    sample_predictions_png,
)
from service.training import _tensors as training_tensors
from service.verify import measure
from tests.support import encode

TINY = TrainConfig(epochs=1, train_limit=128, batch_size=32)


def _weights(trained):
    return {name: tensor.clone() for name, tensor in trained.model.state_dict().items()}


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not():
    first, second = fit(TINY, progress=False), fit(TINY, progress=False)
    other = fit(replace(TINY, seed=1), progress=False)
    assert first.history == second.history
    for name, tensor in _weights(first).items():
        assert torch.equal(tensor, _weights(second)[name]), name
    assert any(not torch.equal(tensor, _weights(other)[name]) for name, tensor in _weights(first).items())


def test_training_leaves_the_callers_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(TINY, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_the_split_is_stratified_disjoint_and_fixed_by_its_seed():
    split = split_digits(split_seed=0, test_fraction=0.2)
    again = split_digits(split_seed=0, test_fraction=0.2)
    other = split_digits(split_seed=1, test_fraction=0.2)
    assert np.array_equal(split.test, again.test)
    assert not np.array_equal(split.test, other.test)
    assert not set(split.train) & set(split.test)
    assert len(split.train) + len(split.test) == len(split.targets)
    counts = np.bincount(split.targets[split.test], minlength=10)
    assert counts.min() >= 30  # every digit held out, about a fifth of each


def test_training_sees_exactly_what_the_service_makes_of_an_uploaded_png():
    split = split_digits()
    pixels = split.images[split.test[:5]]
    served = torch.stack([
        preprocess(decode_image(encode(digit_image(p)), "digit.png", 10_000), InputSpec()) for p in pixels
    ])
    assert torch.equal(training_tensors(pixels), served)
    assert served.shape == (5, 1, 28, 28)
    assert float(served.max()) == 1.0  # 16 (full ink) maps to white, as a client's 8-bit image has it


def test_digit_image_is_white_on_black_8_bit():
    image = digit_image(np.array([[0, 16], [8, 4]]))
    assert image.mode == "L"
    assert np.asarray(image).ravel().tolist() == [0, 255, 128, 64]


def test_the_checkpoint_is_what_the_registry_reads(trained_checkpoint):
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    assert {"model_state_dict", "optimiser_state_dict", "epoch", "train_loss", "test_loss"} <= set(checkpoint)
    assert checkpoint["metadata"] == {
        "architecture": "digit_cnn",
        "input_shape": [1, 28, 28],
        "normalize": None,
        "polarity": "light-on-dark",
        "labels": list(LABELS),
    }
    classifier, metadata = read_model(trained_checkpoint.read_bytes())
    assert classifier.labels == LABELS
    assert classifier.input_spec == InputSpec()
    assert classifier.input_spec.polarity == "light-on-dark"


def test_default_training_reaches_95_percent_on_held_out_digits_sent_as_png(trained_checkpoint):
    classifier, _ = read_model(trained_checkpoint.read_bytes())
    accuracy, count = measure(classifier)
    assert count == 360
    assert accuracy >= 0.95
    logged = torch.load(trained_checkpoint, weights_only=True)["test_accuracy"]
    assert accuracy == pytest.approx(logged, abs=1 / count)


def test_plots_are_png_images():
    targets = np.array([0, 1, 2, 3, 3])
    predictions = np.array([0, 1, 2, 3, 5])
    images = split_digits().images[:5]
    for data in (confusion_matrix_png(targets, predictions), sample_predictions_png(images, targets, predictions)):
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 100
