"""Secure defaults, against real gunicorn: API key, CORS, secrets kept out of sight, no unpickling.

- With API_KEY set, predict and version need ``Authorization: Bearer <key>`` (JSON 401 otherwise);
  health, metrics and the spec stay open, and the spec declares the bearer scheme.
- CORS is off unless CORS_ORIGINS lists origins; then only those, never with credentials.
- API_KEY and MLFLOW_TRACKING_PASSWORD never show in logs (even at DEBUG), errors or responses.
- A model file that would run code when unpickled is refused at start-up, and its code never runs.
"""

import base64
import io
import pickle
import zipfile
from uuid import uuid4

import pytest
import requests
import torch

from tests import images
from tests.support import SERVICE_VARIABLES, multipart_body, run_gunicorn

pytestmark = pytest.mark.slow

# None removes a variable from the server's environment; run_gunicorn sets WEB_CONCURRENCY itself.
CLEAN = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
API_KEY = f"key-{uuid4().hex}"
TRACKING_PASSWORD = f"pw-{uuid4().hex}"
ALLOWED = ["https://app.example", "https://admin.example"]
PREDICT = "/api/v1/model/predict"
VERSION = "/api/v1/model/version"


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def png_upload():
    return {"files": {"image_file": ("digit.png", images.png())}}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_checkpoint):
    """gunicorn with an API key, a tracking password in its environment and two CORS origins."""
    env = {
        **CLEAN,
        "PRED_MODEL_PATH": tiny_checkpoint,
        "API_KEY": API_KEY,
        "MLFLOW_TRACKING_USERNAME": "service",
        "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD,
        "CORS_ORIGINS": ",".join(ALLOWED),
    }
    with run_gunicorn(tmp_path_factory.mktemp("guarded"), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def default(tmp_path_factory, tiny_checkpoint):
    """gunicorn with nothing but a model configured."""
    with run_gunicorn(tmp_path_factory.mktemp("default"), env={**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint}) as server:
        yield server


# -- API key ------------------------------------------------------------------------------------

REFUSED = [
    ("no Authorization header", {}),
    ("wrong key", bearer("not-the-key")),
    ("key with a character too many", bearer(API_KEY + "x")),
    ("key with a character missing", bearer(API_KEY[:-1])),
    ("empty bearer token", {"Authorization": "Bearer "}),
    ("the key without a scheme", {"Authorization": API_KEY}),
    ("the key as Basic credentials", {"Authorization": "Basic " + base64.b64encode(f"x:{API_KEY}".encode()).decode()}),
    ("the key as another header", {"X-API-Key": API_KEY}),
]


@pytest.mark.parametrize(
    "method, path, kwargs", [("POST", PREDICT, png_upload()), ("GET", VERSION, {})], ids=["predict", "version"]
)
@pytest.mark.parametrize("name, headers", REFUSED, ids=[name for name, _ in REFUSED])
def test_model_endpoints_refuse_requests_without_the_key(guarded, method, path, kwargs, name, headers):
    response = requests.request(method, guarded.url + path, headers=headers, timeout=30, **kwargs)
    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["X-Request-ID"]
    body = response.json()
    assert body["code"] == 401 and "Authorization: Bearer" in body["message"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_model_endpoints_answer_with_the_key(guarded, scheme):
    headers = {"Authorization": f"{scheme} {API_KEY}"}
    predicted = requests.post(guarded.url + PREDICT, headers=headers, timeout=30, **png_upload())
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["data"][0]["image_filename"] == "digit.png"
    version = requests.get(guarded.url + VERSION, headers=headers, timeout=30)
    assert version.status_code == 200, version.text
    assert len(version.json()["data"]["sha256"]) == 64


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics", "/openapi.json", "/swagger-ui"])
def test_probes_metrics_and_docs_stay_open(guarded, path):
    assert requests.get(guarded.url + path, timeout=30).status_code == 200


def test_the_spec_declares_the_bearer_scheme_for_swagger_ui(guarded, default):
    spec = requests.get(guarded.url + "/openapi.json", timeout=30).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}]
    # The open endpoints say so; the model endpoints inherit the requirement.
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert spec["paths"][path]["get"]["security"] == []
    assert "security" not in spec["paths"][PREDICT]["post"]
    assert "401" in spec["paths"][PREDICT]["post"]["responses"]
    # Without a key there is nothing to authorise: the spec does not pretend otherwise.
    open_spec = requests.get(default.url + "/openapi.json", timeout=30).json()
    assert "security" not in open_spec
    assert "securitySchemes" not in open_spec.get("components", {})
    assert requests.get(default.url + VERSION, timeout=30).status_code == 200


# -- CORS ---------------------------------------------------------------------------------------


def preflight(server, origin):
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return requests.options(server.url + PREDICT, headers=headers, timeout=30)


def test_cors_is_off_by_default(default):
    for origin in ALLOWED + ["https://evil.example"]:
        response = requests.get(default.url + VERSION, headers={"Origin": origin}, timeout=30)
        assert response.status_code == 200
        assert not any(name.lower().startswith("access-control-") for name in response.headers), response.headers
        answer = preflight(default, origin)
        assert not any(name.lower().startswith("access-control-") for name in answer.headers), answer.headers


@pytest.mark.parametrize("origin", ALLOWED)
def test_cors_allows_the_listed_origins_without_credentials(guarded, origin):
    response = requests.get(guarded.url + VERSION, headers={"Origin": origin, **bearer(API_KEY)}, timeout=30)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in response.headers["Vary"]
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]
    # A browser app can read the 401 too, and fix its request.
    refused = requests.get(guarded.url + VERSION, headers={"Origin": origin}, timeout=30)
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == origin
    answer = preflight(guarded, origin)
    assert answer.status_code == 200  # preflights carry no credentials and need none
    assert answer.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert "authorization" in answer.headers["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Credentials" not in answer.headers


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "https://app.example.evil.example", "http://app.example", "null"]
)
def test_cors_ignores_other_origins(guarded, origin):
    response = requests.get(guarded.url + VERSION, headers={"Origin": origin, **bearer(API_KEY)}, timeout=30)
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Origin" not in preflight(guarded, origin).headers


def test_a_wildcard_cors_origin_is_refused_at_start(tmp_path, tiny_checkpoint):
    env = {**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint, "CORS_ORIGINS": "*"}
    with run_gunicorn(tmp_path, env=env, ready=False) as server:
        assert server.process.wait(timeout=60) != 0
    assert [line for line in server.log().splitlines() if "CORS_ORIGINS" in line] == [
        "error: CORS_ORIGINS: list the allowed origins explicitly; '*' is not accepted"
    ]


# -- secrets ------------------------------------------------------------------------------------

SECRETS = {"API_KEY": API_KEY, "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD}


def assert_no_secret_in(text, where):
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} appears in {where}"


def test_secrets_never_appear_in_logs_errors_or_responses(tmp_path, tiny_checkpoint):
    env = {
        **CLEAN,
        "PRED_MODEL_PATH": tiny_checkpoint,
        "API_KEY": API_KEY,
        "MLFLOW_TRACKING_USERNAME": "service",
        "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD,
        "LOG_LEVEL": "DEBUG",
        "MAX_CONTENT_LENGTH": "50000",
    }
    malformed, malformed_type = multipart_body([(b"image_file", b"\xff.png", images.png())])
    with run_gunicorn(tmp_path, env=env) as server:
        url, key = server.url, bearer(API_KEY)
        responses = [
            *(requests.get(url + VERSION, headers=headers, timeout=30) for _, headers in REFUSED),
            *(requests.post(url + PREDICT, headers=headers, timeout=30, **png_upload()) for _, headers in REFUSED),
            requests.get(url + VERSION, headers=key, timeout=30),
            requests.post(url + PREDICT, headers=key, timeout=30, **png_upload()),
            requests.post(url + PREDICT, headers=key, timeout=30, files={"image_file": ("t.png", b"text")}),
            requests.post(url + PREDICT, headers=key, timeout=30, files={"image_file": ("b.png", b"x" * 60000)}),
            requests.post(url + PREDICT, headers={**key, "Content-Type": malformed_type}, data=malformed, timeout=30),
            requests.post(url + PREDICT + "?top_k=99", headers=key, timeout=30, **png_upload()),
            requests.delete(url + VERSION, headers=key, timeout=30),
            requests.get(url + "/nowhere", headers=key, timeout=30),
            requests.get(url + "/openapi.json", timeout=30),
            requests.get(url + "/metrics", timeout=30),
            requests.get(url + "/health/ready", timeout=30),
        ]
        statuses = {response.status_code for response in responses}
        assert {200, 400, 401, 404, 405, 413, 422} <= statuses
        for response in responses:
            assert_no_secret_in(response.text, f"the {response.status_code} answer to {response.request.url}")
            assert_no_secret_in(repr(response.headers), f"the headers of {response.request.url}")
        version = responses[len(REFUSED) * 2].json()["data"]
        assert_no_secret_in(repr(version), "/api/v1/model/version")
    log = server.log()
    assert "DEBUG" in log and "401" in log  # the log did record the requests, in detail
    assert_no_secret_in(log, "the server log")


def test_secrets_never_appear_when_start_up_fails(tmp_path):
    env = {
        **CLEAN,
        "PRED_MODEL_PATH": tmp_path / "missing.pt",
        "API_KEY": API_KEY,
        "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD,
        "LOG_LEVEL": "DEBUG",
    }
    with run_gunicorn(tmp_path, env=env, ready=False) as server:
        assert server.process.wait(timeout=60) != 0
    assert "error: PRED_MODEL_PATH:" in server.log()
    assert_no_secret_in(server.log(), "the start-up error")


# -- malicious model files ----------------------------------------------------------------------


class CreatesFile:
    """Unpickled, this opens (so creates) ``path``: a stand-in for any code an attacker would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def torch_checkpoint(path, payload):
    torch.save({"model_state_dict": payload, "metadata": {}}, path)


def bare_pickle(path, payload):
    path.write_bytes(pickle.dumps(payload, protocol=2))


def torchscript_lookalike(path, payload):
    """A zip laid out like a TorchScript archive, whose data.pkl is the payload."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/version", "3\n")
        archive.writestr("model/code/__torch__.py", "")
        archive.writestr("model/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("model/data.pkl", pickle.dumps(payload, protocol=2))
    path.write_bytes(buffer.getvalue())


def unsafe_load(path):
    """What a careless loader would do with each kind of file (here, to show the payload is live)."""
    if zipfile.is_zipfile(path) and "model/data.pkl" in zipfile.ZipFile(path).namelist():
        return pickle.loads(zipfile.ZipFile(path).read("model/data.pkl"))
    if zipfile.is_zipfile(path):
        return torch.load(path, weights_only=False)
    return pickle.loads(path.read_bytes())


@pytest.mark.parametrize("write", [torch_checkpoint, bare_pickle, torchscript_lookalike], ids=lambda f: f.__name__)
def test_a_malicious_pickle_is_refused_at_start_and_never_runs(tmp_path, write):
    marker = tmp_path / "payload-ran"
    model_path = tmp_path / "models" / "abc" / "model" / "model.pt"
    model_path.parent.mkdir(parents=True)
    write(model_path, CreatesFile(marker))

    with run_gunicorn(tmp_path, env={**CLEAN, "PRED_MODEL_PATH": model_path}, ready=False) as server:
        assert server.process.wait(timeout=60) != 0
    output = server.log()
    assert not marker.exists(), "the payload ran"
    naming = [line for line in output.splitlines() if "PRED_MODEL_PATH" in line]
    assert len(naming) == 1, output
    assert naming[0].startswith(f"error: PRED_MODEL_PATH: {model_path}: ") and naming[0].isprintable(), naming
    assert "Traceback" not in output and "Booting worker" not in output, output

    # The control: loaded the careless way, the same file does run its payload.
    unsafe_load(model_path)
    assert marker.exists()
