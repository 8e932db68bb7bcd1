"""Optional API-key authentication for the model endpoints."""

import hmac

from flask import current_app, request
from flask_smorest import abort

BEARER_SCHEME = {"type": "http", "scheme": "bearer", "description": "The service's API_KEY."}


def carries_api_key():
    """True when an API_KEY is configured and the request carries it (``Authorization: Bearer <key>``)."""
    key = current_app.config.get("API_KEY")
    if not key:
        return False
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # compare_digest takes time independent of where the strings differ.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def require_api_key():
    """Refuse the request with 401 unless it carries ``Authorization: Bearer <API_KEY>``.

    Does nothing when no API_KEY is configured, and lets CORS preflight requests through.
    """
    if not current_app.config.get("API_KEY") or request.method == "OPTIONS":
        return
    if not carries_api_key():
        abort(
            401,
            message="missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="prediction-service"'},
        )
