"""Logging configuration: one format for the app and gunicorn, text or JSON lines."""

import logging.config

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s [%(request_id)s] %(message)s"
JSON_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s %(request_id)s %(message)s"
JSON_FORMATTER = "pythonjsonlogger.json.JsonFormatter"


def logging_config(level="INFO", fmt="text"):
    """Return a ``dictConfig`` mapping: app and gunicorn errors to stderr, access lines to stdout.

    Every line logged while a request is served, the access line included, carries the id of
    that request (``request_id``); ``fmt="json"`` makes each line one JSON object.
    """
    if fmt == "json":
        formatters = {
            "default": {"()": JSON_FORMATTER, "format": JSON_FORMAT, "rename_fields": {"levelname": "level"}},
            "access": {"()": JSON_FORMATTER, "format": "%(asctime)s %(name)s %(request_id)s %(message)s"},
        }
    else:
        formatters = {"default": {"format": TEXT_FORMAT}, "access": {"format": "%(message)s"}}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "service.observability.RequestIdFilter"}},
        "formatters": formatters,
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            },
            "access": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "access",
                "filters": ["request_id"],
            },
        },
        "root": {"level": level, "handlers": ["default"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["default"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }


def capture_warnings():
    """Send Python warnings (torch's, Pillow's) through logging, so they keep the line format."""
    logging.captureWarnings(True)


def configure_logging(level="INFO", fmt="text"):
    """Apply :func:`logging_config` (for processes gunicorn does not configure)."""
    logging.config.dictConfig(logging_config(level, fmt))
    capture_warnings()
