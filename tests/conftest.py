"""Fixtures: small model files and images made on the spot, apps and test clients."""

import pytest

from service import create_app
from service.registry import registry
from tests.support import write_template_checkpoint

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A template-format checkpoint (random weights) laid out as models/<run_id>/model/model.pt."""
    root = tmp_path_factory.mktemp("store")
    return write_template_checkpoint(root / "models" / RUN_ID / "model" / "model.pt")


@pytest.fixture
def app(tiny_checkpoint):
    app = create_app({"TESTING": True, "PRED_MODEL_PATH": str(tiny_checkpoint)})
    yield app
    registry.configure({})  # the registry is per process: leave it empty for the next test


@pytest.fixture
def client(app):
    return app.test_client()
