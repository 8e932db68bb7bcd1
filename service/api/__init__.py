"""The HTTP API: one blueprint per resource and version."""

from flask import current_app

from service.registry import EXTENSION

MODEL_VERSION_HEADER = "X-Model-Version"


def model_registry():
    """The model registry of the app handling the request."""
    return current_app.extensions[EXTENSION]
