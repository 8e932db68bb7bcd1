"""The parity check: held-out digits sent as PNG must score what training measured."""

import io

import pytest
import torch
from PIL import Image

from service.formats import read_model
from service.verify import check, held_out_pngs, verify_classifier
from tests.support import free_port


def _skewed(trained_checkpoint, tmp_path, **metadata):
    """The trained checkpoint with some of its metadata changed, read as the service reads it."""
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["metadata"].update(metadata)
    path = tmp_path / "skewed.pt"
    torch.save(checkpoint, path)
    return read_model(path.read_bytes())[0]


@pytest.fixture(scope="module")
def logged_accuracy(trained_checkpoint):
    return torch.load(trained_checkpoint, weights_only=True)["test_accuracy"]


def test_held_out_pngs_are_the_split_as_a_client_sends_it():
    pngs = held_out_pngs(split_seed=0, test_fraction=0.2)
    assert len(pngs) == 360
    assert pngs != held_out_pngs(split_seed=1, test_fraction=0.2)
    name, data, label = pngs[0]
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.mode, image.size) == ("PNG", "L", (8, 8))
    assert label in [str(d) for d in range(10)] and name.endswith(".png")


def test_the_trained_model_passes(trained_checkpoint, logged_accuracy):
    classifier, _ = read_model(trained_checkpoint.read_bytes())
    report = check(classifier, logged_accuracy)
    assert report.ok, report.summary
    assert report.count == 360
    assert f"{logged_accuracy:.2%}" in report.summary


def test_a_model_whose_labels_are_out_of_order_fails(trained_checkpoint, tmp_path, logged_accuracy):
    classifier = _skewed(trained_checkpoint, tmp_path, labels=[str(d) for d in reversed(range(10))])
    report = check(classifier, logged_accuracy, source="run abc")
    assert not report.ok
    assert report.accuracy < logged_accuracy - 0.5
    assert "points apart" in report.summary and "run abc logged" in report.summary
    assert "\n" not in report.summary


def test_serving_with_other_preprocessing_than_training_fails(trained_checkpoint, tmp_path, logged_accuracy):
    classifier = _skewed(trained_checkpoint, tmp_path, normalize={"mean": [0.5], "std": [0.25]})
    report = check(classifier, logged_accuracy)
    assert not report.ok, report.summary


def test_one_point_of_difference_is_tolerated_and_more_is_not(trained_checkpoint, logged_accuracy):
    classifier, _ = read_model(trained_checkpoint.read_bytes())
    assert check(classifier, logged_accuracy + 0.009).ok
    assert not check(classifier, logged_accuracy + 0.011).ok


def test_without_a_run_id_the_check_fails(trained_checkpoint):
    classifier, _ = read_model(trained_checkpoint.read_bytes())
    report = verify_classifier(classifier, None)
    assert not report.ok
    assert "PRED_MODEL_UUID" in report.summary


def test_an_unreachable_tracking_server_fails_the_check_quickly(trained_checkpoint, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    classifier, _ = read_model(trained_checkpoint.read_bytes())
    report = verify_classifier(classifier, "0123456789abcdef0123456789abcdef")
    assert not report.ok
    assert "cannot reach the MLflow tracking server" in report.summary


def test_a_local_store_that_cannot_be_opened_fails_the_check(trained_checkpoint, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/no-such-dir/mlflow.db")
    classifier, _ = read_model(trained_checkpoint.read_bytes())
    report = verify_classifier(classifier, "0123456789abcdef0123456789abcdef")
    assert not report.ok
    assert "cannot open the MLflow tracking store at sqlite:////proc/no-such-dir/mlflow.db" in report.summary
    assert "\n" not in report.summary
