"""Fixtures: small model files and images made on the spot, apps and test clients."""

import pytest

from service import create_app
from tests.support import SERVICE_VARIABLES, write_template_checkpoint

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def default_environment(monkeypatch):
    """Start every test from the default settings, whatever the developer's shell exports."""
    for name in SERVICE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A template-format checkpoint (random weights) laid out as models/<run_id>/model/model.pt."""
    root = tmp_path_factory.mktemp("store")
    return write_template_checkpoint(root / "models" / RUN_ID / "model" / "model.pt")


@pytest.fixture
def app(tiny_checkpoint):
    return create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint)})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_app(tiny_checkpoint):
    """Create apps with settings of the test's choosing (the tiny checkpoint unless told otherwise)."""

    def make(**config):
        return create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint), **config})

    return make


TRAINED_RUN_ID = "fedcba9876543210fedcba9876543210"


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """A really trained checkpoint (default training settings, no MLflow) as models/<run_id>/model/model.pt.

    Its held-out accuracy, as measured by training, is stored in it under ``test_accuracy``.
    """
    from service.training import TrainConfig, fit

    root = tmp_path_factory.mktemp("trained")
    return fit(TrainConfig(), progress=False).save(root / "models" / TRAINED_RUN_ID / "model" / "model.pt")


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """A tracking store holding a demo run, as ``make serve`` leaves in var/mlflow/ (quickly trained:
    one epoch on a few hundred digits), registered as digit-classifier@champion."""
    from service import demo, mlflow_store
    from service.training import DEFAULT_EXPERIMENT, TrainConfig, train_and_log
    from tests.support import mlflow_server

    store = tmp_path_factory.mktemp("demo-store")
    with mlflow_server(store) as url:
        train_and_log(
            TrainConfig(epochs=2, train_limit=600), mlflow_store.connect(url), DEFAULT_EXPERIMENT,
            demo.DEMO_MODEL_NAME, demo.DEMO_ALIAS, tags={demo.DEMO_TAG: "true"}, progress=False,
        )
    return store
