"""Service configuration: settings from the environment, logging, gunicorn."""
