"""The two floors the service is measured against: the least a request can cost in this stack.

    gunicorn -w 2 -k sync bench.floors:wsgi_floor
    gunicorn -w 2 -k sync bench.floors:flask_floor

``wsgi_floor`` is a bare WSGI callable: it reads the body and answers fixed JSON, so it costs
what gunicorn, the socket and the load generator cost. ``flask_floor`` is a bare Flask app whose
view parses the multipart body with ``request.files`` and answers JSON: what any Flask service
taking uploads pays before it does anything of its own. Neither runs a model. ``make bench``
posts the same multipart digit to both as to the service.
"""

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
