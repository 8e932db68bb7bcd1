"""Prometheus metrics, merged across gunicorn workers."""

from flask import Response, current_app
from flask_smorest import Blueprint

from service.observability import render_metrics

blp = Blueprint("metrics", __name__, description="Prometheus metrics.")


@blp.route("/metrics")
@blp.doc(security=[])
@blp.response(200, content_type="text/plain", description="Prometheus text exposition format.")
@blp.doc(responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics():
    """Request, inference and model metrics for Prometheus to scrape"""
    body, content_type = render_metrics(current_app.config.get("PROMETHEUS_MULTIPROC_DIR"))
    return Response(body, content_type=content_type)
