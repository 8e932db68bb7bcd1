"""WSGI entry point: ``gunicorn -c config/gunicorn.conf.py wsgi:app`` (and ``flask --app wsgi``)."""

import sys

from dotenv import load_dotenv

# gunicorn does not read .env itself; variables already set in the environment win.
load_dotenv()

from config.settings import ConfigError  # noqa: E402  (after .env is loaded)
from service import create_app  # noqa: E402

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"error: {exc}")
