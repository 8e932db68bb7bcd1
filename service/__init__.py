"""The prediction service: a Flask app factory wiring config, logging, API and CLI."""

import logging

from flask import Blueprint
from flask_cors import CORS
from swagger_ui_bundle import swagger_ui_path

from config import settings
from config.logging import configure_logging
from service import cli, observability
from service.api import health, metrics
from service.api.v1 import model as model_v1
from service.api.v2 import inference as inference_v2
from service.http import ServiceApi, ServiceFlask
from service.registry import EXTENSION, ModelRegistry
from service.security import BEARER_SCHEME

SWAGGER_UI_ASSETS = "/swagger-ui/assets"

API_DESCRIPTION = """\
Classifies images with a PyTorch model tracked in MLflow.

Post images as multipart field `image_file` to `/api/v1/model/predict`; every error is JSON
with `code`, `status` and `message`.
"""


def _openapi_config(config):
    spec_options = {"info": {"description": API_DESCRIPTION}}
    if config.get("API_KEY"):
        spec_options["security"] = [{"bearerAuth": []}]
    return {
        "API_TITLE": "Prediction service",
        "API_VERSION": "v1",
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "/swagger-ui",
        # Served by this app from the swagger-ui-bundle package: no CDN, works offline.
        "OPENAPI_SWAGGER_UI_URL": f"{SWAGGER_UI_ASSETS}/",
        "API_SPEC_OPTIONS": spec_options,
    }


def create_app(test_config=None):
    """Create the app: config -> logging -> extensions -> blueprints -> CLI.

    Settings come from the environment (see README); ``test_config`` overrides them. The model
    is not loaded here: gunicorn loads it before forking (service/hooks.py), and other processes
    load it on first use, so the ``flask`` CLI works with no model configured. Each app has its
    own model registry, ``app.extensions["model_registry"]``.
    """
    app = ServiceFlask(__name__)
    # Keys in schema order, as the template answered: {"image_filename": ..., "prediction": ...}.
    app.json.sort_keys = False
    app.config.from_mapping(settings.from_env().as_config())
    if test_config:
        app.config.update(test_config)
    app.config.update(_openapi_config(app.config))

    if not logging.getLogger().handlers:
        configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])

    observability.init_app(app)
    if app.config["CORS_ORIGINS"]:
        CORS(
            app,
            origins=list(app.config["CORS_ORIGINS"]),
            supports_credentials=False,
            expose_headers=[observability.REQUEST_ID_HEADER],
            allow_headers=["Authorization", "Content-Type", observability.REQUEST_ID_HEADER],
        )
    app.extensions[EXTENSION] = ModelRegistry.from_config(app.config)

    api = ServiceApi(app)
    if app.config.get("API_KEY"):
        api.spec.components.security_scheme("bearerAuth", BEARER_SCHEME)
    api.register_blueprint(model_v1.blp)
    api.register_blueprint(inference_v2.blp)
    api.register_blueprint(health.blp)
    api.register_blueprint(metrics.blp)
    app.register_blueprint(
        Blueprint("swagger_ui_assets", __name__, static_folder=swagger_ui_path, static_url_path=SWAGGER_UI_ASSETS)
    )

    app.cli.add_command(cli.model_cli)
    return app
