"""Optional API-key authentication for the model endpoints."""

import hmac

from flask import current_app, request
from flask_smorest import abort

BEARER_SCHEME = {"type": "http", "scheme": "bearer", "description": "The service's API_KEY."}


def require_api_key():
    """Refuse the request with 401 unless it carries ``Authorization: Bearer <API_KEY>``.

    Does nothing when no API_KEY is configured, and lets CORS preflight requests through.
    """
    key = current_app.config.get("API_KEY")
    if not key or request.method == "OPTIONS":
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # compare_digest takes time independent of where the strings differ.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        abort(
            401,
            message="missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="prediction-service"'},
        )
