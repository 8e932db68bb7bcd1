"""The ``model`` resource: predictions and the identity of the served model."""

import logging
import time

from flask import current_app
from flask_smorest import Blueprint, abort

from service import observability, security
from service.api import MODEL_VERSION_HEADER, model_registry
from service.http import UploadParser
from service.images import ImageError, PixelBudget
from service.registry import ModelLoadError, ModelNotReady
from service.schemas import PredictQuerySchema, PredictResponseSchema, UploadSchema, VersionResponseSchema

log = logging.getLogger(__name__)

# What the service decodes; the part's own Content-Type is not trusted, the bytes decide.
IMAGE_TYPES = "image/png, image/jpeg, image/gif, image/bmp, image/webp, image/tiff"

MODEL_VERSION_HEADER_DOC = {
    MODEL_VERSION_HEADER: {
        "description": "The model version that answered: the registered version, else the MLflow run id, "
        "else sha256:<first 12 hex digits of the weights file>.",
        "schema": {"type": "string"},
    }
}

blp = Blueprint("model", __name__, url_prefix="/api/v1/model", description="Classify images with the served model.")
blp.ARGUMENTS_PARSER = UploadParser()  # a request without image_file is told what it sent instead
blp.before_request(security.require_api_key)


def _served():
    """The model version that answers this request, start to end (a rollout never changes it midway)."""
    try:
        return model_registry().get()
    except (ModelLoadError, ModelNotReady) as exc:
        log.error("model unavailable: %s", exc)
        abort(503, message=f"the model is not available: {exc}")


@blp.route("/predict", methods=["POST"])
# Schema instances, not classes: webargs would build a schema from a class on every request.
@blp.arguments(PredictQuerySchema(), location="query", as_kwargs=True)
@blp.arguments(UploadSchema(), location="files", as_kwargs=True)
@blp.response(200, PredictResponseSchema, headers=MODEL_VERSION_HEADER_DOC)
@blp.alt_response(400, response="BAD_REQUEST")
@blp.alt_response(401, response="UNAUTHORIZED")
@blp.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
@blp.alt_response(503, response="SERVICE_UNAVAILABLE")
@blp.doc(requestBody={"content": {"multipart/form-data": {"encoding": {"image_file": {"contentType": IMAGE_TYPES}}}}})
def predict(image_file, top_k=None):
    """Classify one or more images

    Send each image as a multipart field named `image_file` (repeat the field for several;
    at most MAX_FILES). All images go through one batched forward pass, and the predictions
    come back in upload order. Add `?top_k=N` for the N most probable labels of each image
    (all of them when N is larger). Other form fields are ignored. A request without
    `image_file` gets a 422 whose message names the fields and files it did send.
    """
    app = current_app._get_current_object()  # one look-up of the proxy, not one per use
    config = app.config
    max_files = config["MAX_FILES"]
    if len(image_file) > max_files:
        abort(422, message=f"too many files: {len(image_file)} sent, at most {max_files} (MAX_FILES) per request")
    served = _served()
    classifier = served.classifier
    if top_k is not None:
        top_k = min(top_k, len(classifier.labels))  # all of them, as the spec says
    max_pixels = config["MAX_IMAGE_PIXELS"]
    budget = PixelBudget(max_pixels)  # for all images of the request together
    try:
        tensors = [classifier.prepare(upload.read(), upload.filename, max_pixels, budget) for upload in image_file]
    except ImageError as exc:
        abort(422, message=f"image_file {exc}", errors={"files": {"image_file": [str(exc)]}})
    started = time.perf_counter()
    predictions = classifier.classify(tensors, top_k)
    observability.record_predictions(
        [p.label for p in predictions], len(tensors), time.perf_counter() - started, classifier.engine
    )
    body = {
        "data": [
            {
                "image_filename": upload.filename,
                "prediction": p.label,
                "confidence": p.confidence,
                **({"top_k": [{"label": label, "probability": prob} for label, prob in p.top_k]} if p.top_k else {}),
            }
            for upload, p in zip(image_file, predictions)
        ]
    }
    # The body is already what PredictResponseSchema dumps (its fields, in its order, as str and
    # float): answered as a Response, it skips a second pass through marshmallow. The schema
    # still documents it.
    return app.json.response(body), {MODEL_VERSION_HEADER: served.version}


@blp.route("/version")
@blp.response(200, VersionResponseSchema, headers=MODEL_VERSION_HEADER_DOC)
@blp.alt_response(401, response="UNAUTHORIZED")
@blp.alt_response(503, response="SERVICE_UNAVAILABLE")
def version():
    """Identify the served model

    `model_uuid` is the MLflow run id the weights came from (as in the template); the other
    fields say which file is served, its SHA-256, the architecture, labels and device, and
    `rollout` the outcome of the last rollout (a refused version and why, for one).
    """
    served = _served()
    return {"data": model_registry().describe(served)}, {MODEL_VERSION_HEADER: served.version}
