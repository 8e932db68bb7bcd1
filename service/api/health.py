"""Liveness and readiness probes for load balancers and Kubernetes."""

from flask_smorest import Blueprint

from service.api import model_registry
from service.schemas import HealthSchema
from service.security import carries_api_key

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
    """This worker has loaded and warmed up the model and can serve predictions.

    When it cannot, `reason` says why in a few words; a request that carries the API key also
    gets `detail`, the whole story (file paths, the tracking server's error).
    """
    registry = model_registry()
    if registry.ready:
        return {"status": "ok"}
    answer = {"status": "unavailable", "reason": registry.reason or "not ready"}
    if carries_api_key():
        answer["detail"] = registry.problem
    return answer, 503
