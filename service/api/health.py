"""Liveness and readiness probes for load balancers and Kubernetes."""

from flask_smorest import Blueprint

from service.api import model_registry
from service.schemas import HealthSchema

blp = Blueprint("health", __name__, url_prefix="/health", description="Probes for orchestrators.")


@blp.route("/live")
@blp.doc(security=[])
@blp.response(200, HealthSchema)
def live():
    """The process is up and answering"""
    return {"status": "ok"}


@blp.route("/ready")
@blp.doc(security=[])
@blp.response(200, HealthSchema)
@blp.alt_response(503, schema=HealthSchema, description="The model is not loaded, not warmed up, or failed a check.")
def ready():
    """This worker has loaded and warmed up the model and can serve predictions"""
    registry = model_registry()
    if registry.ready:
        return {"status": "ok"}
    return {"status": "unavailable", "reason": registry.problem}, 503
