"""The running service against its own OpenAPI spec, fuzzed by schemathesis.

schemathesis generates requests from the spec (valid and invalid ones, undeclared methods,
missing credentials) and sends them to a real gunicorn; every answer is checked with all of its
default checks, for every operation and with no statuses allowed beyond the spec's: no 5xx, a
documented status code, content type and body schema, credentials enforced, 405s with Allow,
schema-valid requests accepted and schema-invalid ones refused.
"""

import hypothesis
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from PIL import Image

from service import create_app
from service.api.v1.model import IMAGE_TYPES
from tests.support import SERVICE_VARIABLES, encode, run_gunicorn

pytestmark = pytest.mark.slow

API_KEY = "schemathesis-test-key"
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "bmp": "BMP", "webp": "WEBP", "tiff": "TIFF"}

CONFIG = {
    "seed": 5,
    # Examples per operation in the fuzzing phase; the coverage phase adds its own edge cases.
    "generation": {"max-examples": 100},
    "auth": {"openapi": {"bearerAuth": {"bearer": API_KEY}}},
    "request-timeout": 30,
}


@st.composite
def _images(draw, fmt):
    """Small random images in ``fmt``: the uploads a schema cannot describe but clients send."""
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["L", "RGB"]))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return encode(Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode), fmt)


# The spec names these media types for the items of image_file: schemathesis then draws real
# images for it (a list, as the property is an array of files).
for _media_type in (t.strip() for t in IMAGE_TYPES.split(",")):
    _format = _PILLOW_FORMATS[_media_type.split("/")[1]]
    schemathesis.openapi.media_type(_media_type, st.lists(_images(_format), min_size=1, max_size=3))


def _spec_with_api_key():
    """The spec the service publishes when API_KEY is set (tests are generated from it at import)."""
    app = create_app({"TESTING": True, "API_KEY": API_KEY})
    return app.test_client().get("/openapi.json").get_json()


SPEC = _spec_with_api_key()
schema = schemathesis.openapi.from_dict(SPEC, config=schemathesis.Config.from_dict(CONFIG))


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """gunicorn as deployed, with an API key, so the bearer scheme is in the spec and enforced."""
    env = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
    env.update(PRED_MODEL_PATH=tiny_checkpoint, API_KEY=API_KEY)
    with run_gunicorn(tmp_path_factory.mktemp("schemathesis"), env=env) as server:
        yield server


def test_the_running_service_publishes_the_fuzzed_spec(served):
    published = requests.get(f"{served.url}/openapi.json", timeout=10).json()
    assert published == SPEC
    assert published["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "The service's API_KEY."
    }


@schema.parametrize()
@hypothesis.settings(deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_every_answer_conforms_to_the_spec(case, served):
    case.call_and_validate(base_url=served.url)


def test_the_fuzzed_server_stayed_healthy_and_logged_no_error(served):
    assert requests.get(f"{served.url}/health/ready", timeout=10).status_code == 200
    log = served.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]
