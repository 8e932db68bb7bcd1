"""The floors the service is measured against: the least a request can cost in this stack.

    gunicorn -w 2 -k sync bench.floors:wsgi_floor
    gunicorn -w 2 -k sync bench.floors:flask_floor
    PRED_MODEL_PATH=model.pt gunicorn -w 2 -k sync bench.floors:model_floor

``wsgi_floor`` is a bare WSGI callable: it reads the body and answers fixed JSON, so it costs
what gunicorn, the socket and the load generator cost. ``flask_floor`` is a bare Flask app whose
view parses the multipart body with ``request.files`` and answers JSON: what any Flask service
taking uploads pays before it does anything of its own. Neither runs a model. ``model_floor`` is
that bare view running the model's calls the service's predict view makes (``Classifier.prepare``
and ``Classifier.classify``, one torch thread per worker, on the engine the service would run:
INFERENCE_ENGINE or its default) and nothing else: no argument or
response schemas, request ids, metrics or access log. Served like this, the model's work costs
what it costs between requests, with cold caches, not what the no-HTTP limit's tight loop says;
what the service costs over ``model_floor`` is its own layers. ``make bench`` posts the same
multipart digit to all three as to the service.
"""

import os
from pathlib import Path

from flask import Flask, jsonify, request

_BODY = b'{"data":[{"image_filename":"digit.png","prediction":"0","confidence":1.0}]}\n'
_HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(_BODY)))]


def wsgi_floor(environ, start_response):
    """Read the whole body, answer fixed JSON (any path, any method)."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    start_response("200 OK", _HEADERS)
    return [_BODY]


flask_floor = Flask(__name__)


@flask_floor.post("/api/v1/model/predict")
def predict():
    """Parse the multipart body; answer one entry per uploaded file."""
    files = request.files.getlist("image_file")
    return jsonify(data=[{"image_filename": f.filename, "prediction": "0", "confidence": 1.0} for f in files])


@flask_floor.get("/health/ready")
def ready():
    """What the benchmark polls before it starts."""
    return {"status": "ok"}


def single_threaded_model(path, engine="torch"):
    """The model file at ``path`` as a worker of the service runs it on two cores (one torch
    thread), warmed up, with the service's default MAX_IMAGE_PIXELS: (classifier, pixels).
    ``engine`` is an INFERENCE_ENGINE: ``torch`` (eager) for the no-HTTP limit; the model floor
    runs on the service's default, as the service does."""
    import torch

    from config.settings import Settings
    from service import engines
    from service.formats import read_model

    torch.set_num_threads(1)
    classifier, metadata = read_model(Path(path).read_bytes())
    choice = engines.choose(classifier, metadata["architecture"], engine, Settings.MAX_FILES)
    if choice.onnx is not None:
        classifier.runner = engines.OnnxRunner(choice.onnx, threads=1)
    classifier.warm_up()
    return classifier, Settings.MAX_IMAGE_PIXELS


model_floor = Flask(f"{__name__}.model")
_classifier = []  # this worker's, loaded by its first readiness probe (after gunicorn's fork)


def _model():
    if not _classifier:
        from config.settings import from_env

        _classifier.append(single_threaded_model(os.environ["PRED_MODEL_PATH"], from_env().INFERENCE_ENGINE))
    return _classifier[0]


@model_floor.post("/api/v1/model/predict")
def predict_with_model():
    """Parse the multipart body, run the predict view's model calls, answer JSON."""
    classifier, max_pixels = _model()
    files = request.files.getlist("image_file")
    predictions = classifier.classify([classifier.prepare(f.read(), f.filename, max_pixels) for f in files])
    return jsonify(data=[
        {"image_filename": f.filename, "prediction": p.label, "confidence": p.confidence}
        for f, p in zip(files, predictions)
    ])


@model_floor.get("/health/ready")
def model_ready():
    """Ready once this worker has its model."""
    _model()
    return {"status": "ok"}
