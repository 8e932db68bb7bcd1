"""The prediction service: a Flask app factory wiring config, logging, API and CLI."""

import io
import logging

from flask import Blueprint, Flask, Request
from flask_cors import CORS
from flask_smorest import Api, abort
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream

from config import settings
from config.logging import configure_logging
from service import cli, observability
from service.api import health, metrics
from service.api.v1 import model as model_v1
from service.registry import registry
from service.security import BEARER_SCHEME

SWAGGER_UI_ASSETS = "/swagger-ui/assets"

API_DESCRIPTION = """\
Classifies images with a PyTorch model tracked in MLflow.

Post images as multipart field `image_file` to `/api/v1/model/predict`; every error is JSON
with `code`, `status` and `message`.
"""


class _BodyLimit(LimitedStream):
    """MAX_CONTENT_LENGTH on a body the server delimits (chunked or not), exactly.

    werkzeug's own guard refuses as soon as a read is tried at the limit, so a body of exactly
    MAX_CONTENT_LENGTH bytes got a 413; this one refuses only when the body goes on past it.
    """

    def __init__(self, source, limit):
        super().__init__(source, limit, is_max=True)
        self._source = source

    def on_exhausted(self):
        if self._source.read(1):
            super().on_exhausted()


class UploadRequest(Request):
    """A request whose uploads stay in memory (bounded by MAX_CONTENT_LENGTH), never on disk."""

    @cached_property
    def stream(self):
        limit = self.max_content_length
        if limit is None or "wsgi.input_terminated" not in self.environ:
            return super().stream
        if self.content_length is not None and self.content_length > limit:
            raise RequestEntityTooLarge()
        return _BodyLimit(self.environ["wsgi.input"], limit)

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()

    def make_form_data_parser(self):
        parser = super().make_form_data_parser()
        parser.silent = False  # a body that cannot be parsed is an error to report, not "no files"
        return parser

    def _load_form_data(self):
        try:
            super()._load_form_data()
        except UnicodeDecodeError:
            abort(400, message=f"malformed {self.mimetype} body: its text, filenames included, must be UTF-8")
        except ValueError as exc:
            abort(400, message=f"malformed {self.mimetype} body: {exc}")


class ServiceApi(Api):
    """flask-smorest's Api, keeping the headers an HTTP error defines (``Allow`` on a 405)."""

    def handle_http_exception(self, error):
        payload, code, headers = super().handle_http_exception(error)
        defined = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        return payload, code, {**defined, **(headers or {})}


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
    is not loaded here: gunicorn loads it before forking (config/gunicorn.conf.py), and other
    processes load it on first use, so the ``flask`` CLI works with no model configured.
    """
    app = Flask(__name__)
    app.request_class = UploadRequest
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
    registry.configure(app.config)

    api = ServiceApi(app)
    if app.config.get("API_KEY"):
        api.spec.components.security_scheme("bearerAuth", BEARER_SCHEME)
    api.register_blueprint(model_v1.blp)
    api.register_blueprint(health.blp)
    api.register_blueprint(metrics.blp)
    app.register_blueprint(
        Blueprint("swagger_ui_assets", __name__, static_folder=swagger_ui_path, static_url_path=SWAGGER_UI_ASSETS)
    )

    app.cli.add_command(cli.model_cli)
    return app
