"""The Open Inference Protocol (KServe V2 REST) for the served model, with binary tensor data.

Clients of KServe, Triton and MLServer (``tritonclient.http``, KServe's clients...) call it
unchanged. Every error under ``/v2`` answers in the protocol's shape, ``{"error": "..."}``.
"""

import logging
import time

import marshmallow as ma
import torch
from flask import Response, current_app, request
from flask_smorest import Blueprint, abort
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from service import observability, security
from service.api import MODEL_VERSION_HEADER, model_registry
from service.api.v2 import tensors
from service.images import ImageError, PixelBudget
from service.registry import ModelLoadError, ModelNotReady

log = logging.getLogger(__name__)

PREFIX = "/v2"
SERVER_NAME = "prediction-service"
SERVER_VERSION = "1.0"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
# The platform each engine is reported as (ONNX Runtime by the name Triton gives it).
PLATFORMS = {"torch": "pytorch", "onnxruntime": "onnxruntime_onnx"}

blp = Blueprint(
    "inference_v2", __name__, url_prefix=PREFIX,
    description="The Open Inference Protocol (KServe V2 REST), with the binary tensor data extension.",
)


@blp.before_request
def _require_api_key():
    """The API key guards everything but the health probes, as it does outside /v2."""
    if request.endpoint not in (f"{blp.name}.server_live", f"{blp.name}.server_ready"):
        security.require_api_key()


# -- schemas (they document the protocol in the OpenAPI spec) -------------------------------------


class ProtocolErrorSchema(ma.Schema):
    """The protocol's error: one line saying what is wrong."""

    error = ma.fields.String(required=True)


class ServerMetadataSchema(ma.Schema):
    name = ma.fields.String(required=True)
    version = ma.fields.String(required=True)
    extensions = ma.fields.List(ma.fields.String(), required=True)


class TensorMetadataSchema(ma.Schema):
    name = ma.fields.String(required=True)
    datatype = ma.fields.String(required=True)
    shape = ma.fields.List(ma.fields.Integer(), required=True, metadata={"description": "-1 is the batch size."})


class ModelMetadataSchema(ma.Schema):
    name = ma.fields.String(required=True)
    versions = ma.fields.List(ma.fields.String(), required=True)
    platform = ma.fields.String(required=True)
    inputs = ma.fields.List(ma.fields.Nested(TensorMetadataSchema), required=True)
    outputs = ma.fields.List(ma.fields.Nested(TensorMetadataSchema), required=True)
    parameters = ma.fields.Dict(metadata={"description": "labels: the label of each class, in output order."})


class TensorParametersSchema(ma.Schema):
    binary_data_size = ma.fields.Integer(
        metadata={"description": "Bytes of this tensor in the binary section after the JSON header."}
    )


class InputTensorSchema(ma.Schema):
    name = ma.fields.String(required=True, metadata={"description": "`image` (BYTES) or `input` (FP32)."})
    datatype = ma.fields.String(required=True, metadata={"description": "BYTES for `image`, FP32 for `input`."})
    shape = ma.fields.List(
        ma.fields.Integer(), required=True,
        metadata={"description": "`image`: [N]; `input`: [N, C, H, W], the model's input shape."},
    )
    parameters = ma.fields.Nested(TensorParametersSchema)
    data = ma.fields.Raw(
        metadata={"description": "`image`: base64 strings of image files; `input`: numbers, row-major (flat or "
                  "nested). Omitted when the tensor is in the binary section."}
    )


class RequestOutputParametersSchema(ma.Schema):
    binary_data = ma.fields.Boolean(metadata={"description": "Return this output in the binary section."})


class RequestOutputSchema(ma.Schema):
    name = ma.fields.String(required=True, metadata={"description": "`probabilities` or `label`."})
    parameters = ma.fields.Nested(RequestOutputParametersSchema)


class RequestParametersSchema(ma.Schema):
    binary_data_output = ma.fields.Boolean(
        metadata={"description": "Return every output in the binary section unless it says otherwise."}
    )


class InferRequestSchema(ma.Schema):
    id = ma.fields.String(metadata={"description": "Echoed in the response."})
    parameters = ma.fields.Nested(RequestParametersSchema)
    inputs = ma.fields.List(ma.fields.Nested(InputTensorSchema), required=True)
    outputs = ma.fields.List(
        ma.fields.Nested(RequestOutputSchema), metadata={"description": "The outputs to return (default: all)."}
    )


class OutputTensorSchema(ma.Schema):
    name = ma.fields.String(required=True)
    datatype = ma.fields.String(required=True)
    shape = ma.fields.List(ma.fields.Integer(), required=True)
    parameters = ma.fields.Nested(TensorParametersSchema)
    data = ma.fields.Raw(metadata={"description": "Row-major values; omitted when in the binary section."})


class InferResponseSchema(ma.Schema):
    model_name = ma.fields.String(required=True)
    model_version = ma.fields.String(required=True)
    id = ma.fields.String()
    outputs = ma.fields.List(ma.fields.Nested(OutputTensorSchema), required=True)


class ReadySchema(ma.Schema):
    """An empty object: the status code is the answer."""


ERROR_RESPONSES = {
    400: "A malformed request: not JSON, a wrong datatype or shape, sizes that do not add up, a truncated "
    "binary section, an undecodable image, or over MAX_FILES or MAX_IMAGE_PIXELS.",
    401: "API_KEY is set and the request lacks `Authorization: Bearer <key>`.",
    404: "No model of that name or version.",
    413: "The body is larger than MAX_CONTENT_LENGTH.",
    503: "The model is not available (not loaded, or it failed a check).",
}


def _errors(*codes):
    """Document the protocol's error responses ``codes``."""

    def decorate(view):
        for code in codes:
            view = blp.alt_response(code, schema=ProtocolErrorSchema, description=ERROR_RESPONSES[code])(view)
        return view

    return decorate


# -- errors ---------------------------------------------------------------------------------------


def _message(error):
    data = getattr(error, "data", None) or {}
    if data.get("message"):
        return str(data["message"])
    if isinstance(error, RequestEntityTooLarge):
        return f"the request body is larger than {current_app.config['MAX_CONTENT_LENGTH']} bytes (MAX_CONTENT_LENGTH)"
    return error.description or error.name


def protocol_error(error):
    """Any HTTP error under /v2, in the protocol's shape; headers the error defines are kept."""
    headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
    headers.update((getattr(error, "data", None) or {}).get("headers") or {})
    return {"error": _message(error)}, error.code, headers


blp.register_error_handler(HTTPException, protocol_error)


@blp.app_errorhandler(404)
@blp.app_errorhandler(405)
def _unrouted(error):
    """A path no route matches: the protocol's shape under /v2, the API's own shape elsewhere."""
    if request.path == PREFIX or request.path.startswith(PREFIX + "/"):
        return protocol_error(error)
    api = current_app.extensions["flask-smorest"]["blp_name_to_api"][blp.name]
    return api.handle_http_exception(error)


def _fail(code, message):
    abort(code, message=message)


# -- the served model -----------------------------------------------------------------------------


def model_name(info):
    """The name clients call the model by: PRED_MODEL_NAME, else the registered model's name, else
    the architecture."""
    return current_app.config.get("PRED_MODEL_NAME") or info.get("model_name") or info.get("architecture")


def _served(name, version=None):
    """The served model version, if it is the one the path names (404 if not, 503 if unavailable)."""
    try:
        served = model_registry().get()
    except (ModelLoadError, ModelNotReady) as exc:
        log.error("model unavailable: %s", exc)
        _fail(503, f"the model is not available: {exc}")
    if name != model_name(served.info):
        _fail(404, f"unknown model {name!r}: this server serves {model_name(served.info)!r}")
    if version is not None and version != served.version:
        _fail(404, f"model {name!r} has no version {version!r}: it serves version {served.version!r}")
    return served


def _metadata(served):
    spec = served.classifier.input_spec
    labels = list(served.classifier.labels)
    return {
        "name": model_name(served.info),
        "versions": [served.version],
        "platform": PLATFORMS[served.classifier.engine],
        "inputs": [
            {"name": tensors.IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": tensors.TENSOR_INPUT, "datatype": "FP32", "shape": [-1, *spec.shape]},
        ],
        "outputs": [
            {"name": tensors.PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(labels)]},
            {"name": tensors.LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"labels": labels},
    }


# -- server ---------------------------------------------------------------------------------------


@blp.route("")
@blp.response(200, ServerMetadataSchema)
@_errors(401)
def server_metadata():
    """Server metadata

    The server's name and version, and the protocol extensions it speaks (`binary_tensor_data`).
    """
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@blp.route("/health/live")
@blp.doc(security=[])
@blp.response(200, ReadySchema)
def server_live():
    """Server liveness

    200 while the process answers.
    """
    return {}


@blp.route("/health/ready")
@blp.doc(security=[])
@blp.response(200, ReadySchema)
@_errors(503)
def server_ready():
    """Server readiness

    200 once this worker has loaded and warmed up the model (and it passed its checks), else 503
    saying why.
    """
    registry = model_registry()
    if not registry.ready:
        _fail(503, f"not ready: {registry.problem}")
    return {}


# -- model ----------------------------------------------------------------------------------------


@blp.route("/models/<name>")
@blp.route("/models/<name>/versions/<version>")
@blp.response(200, ModelMetadataSchema)
@_errors(401, 404, 503)
def model_metadata(name, version=None):
    """Model metadata

    Its name and version, its inputs (`image`: BYTES [N], encoded image files; `input`: FP32
    [N, C, H, W], already preprocessed) and outputs (`probabilities`: FP32 [N, labels];
    `label`: BYTES [N]); -1 stands for the batch size. `parameters.labels` lists the labels in
    the order of `probabilities`.
    """
    served = _served(name, version)
    return _metadata(served), {MODEL_VERSION_HEADER: served.version}


@blp.route("/models/<name>/ready")
@blp.route("/models/<name>/versions/<version>/ready")
@blp.response(200, ReadySchema)
@_errors(401, 404, 503)
def model_ready(name, version=None):
    """Model readiness

    200 when this worker serves the model (and version) named.
    """
    served = _served(name, version)
    return {}, {MODEL_VERSION_HEADER: served.version}


@blp.route("/models/<name>/infer", methods=["POST"])
@blp.route("/models/<name>/versions/<version>/infer", methods=["POST"])
@blp.response(200, InferResponseSchema, description="The outputs asked for. With binary outputs, the body is "
              "the JSON header (`Inference-Header-Content-Length` bytes) followed by their data.")
@_errors(400, 401, 404, 413, 503)
@blp.doc(
    requestBody={
        "required": True,
        "content": {
            "application/json": {"schema": InferRequestSchema},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data: the JSON request, then the tensors' bytes; the "
                "Inference-Header-Content-Length header gives the JSON's length.",
            },
        },
    },
    parameters=[
        {
            "in": "header",
            "name": HEADER_LENGTH,
            "schema": {"type": "integer", "minimum": 2},
            "description": "Length of the JSON request when binary tensor data follows it.",
        }
    ],
)
def infer(name, version=None):
    """Classify a batch

    Send one input: `image`, BYTES [N], each element an image file (PNG, JPEG, GIF, BMP, WebP,
    TIFF), decoded and preprocessed as `/api/v1/model/predict` does; or `input`, FP32 [N, C, H, W],
    already preprocessed for the model. N is 1 to MAX_FILES; the whole batch goes through one
    forward pass. Outputs are `probabilities` (FP32 [N, labels]) and `label` (BYTES [N]); ask for
    some with `outputs`, and for binary ones with `binary_data` / `binary_data_output`.
    In JSON, BYTES elements are base64 strings.
    """
    served = _served(name, version)
    classifier = served.classifier
    config = current_app.config
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        _fail(400, f"Content-Encoding {encoding!r} is not supported: send the request uncompressed")
    try:
        header, binary = tensors.split_body(request.get_data(cache=False), request.headers.get(HEADER_LENGTH))
        parsed = tensors.parse_request(
            header, binary, input_shape=list(classifier.input_spec.shape), max_batch=config["MAX_FILES"]
        )
    except tensors.ProtocolError as exc:
        _fail(400, str(exc))
    if parsed.images is not None:
        max_pixels = config["MAX_IMAGE_PIXELS"]
        budget = PixelBudget(max_pixels)  # for all images of the request together, as the multipart API
        prepared = []
        for index, data in enumerate(parsed.images):
            try:
                prepared.append(classifier.prepare(data, f"element {index}", max_pixels, budget))
            except ImageError as exc:
                _fail(400, f"input {tensors.IMAGE_INPUT!r} element {index}: {exc.problem}")
        batch = torch.stack(prepared)
    else:
        batch = torch.from_numpy(parsed.tensor)
    started = time.perf_counter()
    probabilities = classifier.forward(batch)
    if probabilities.shape != (parsed.batch_size, len(classifier.labels)):
        raise RuntimeError(f"the network returned {list(probabilities.shape)} for {parsed.batch_size} inputs")
    labels = [classifier.labels[i] for i in probabilities.argmax(dim=1).tolist()]
    observability.record_predictions(labels, parsed.batch_size, time.perf_counter() - started, classifier.engine)
    body, header_length = tensors.encode_response(
        model_name(served.info), served.version, parsed.id, parsed.outputs, probabilities.numpy(), labels
    )
    response = Response(body, mimetype="application/json" if header_length is None else "application/octet-stream")
    if header_length is not None:
        response.headers[HEADER_LENGTH] = str(header_length)
    response.headers[MODEL_VERSION_HEADER] = served.version
    return response
