"""The Open Inference Protocol (KServe V2 REST), driven by the real client from PyPI against gunicorn,
and hostile V2 requests answered with 400 and the protocol's error shape."""

import base64
import json
import struct

import numpy as np
import pytest
import requests
import torch
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests import images
from tests.support import SERVICE_VARIABLES, digit_batch, encode, run_gunicorn, template_probabilities

CLEAN = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
NAME = "digit_cnn"  # the architecture: the model's name when nothing else names it
API_KEY = "v2-test-key-0123456789"
BATCH = 16


def png_batch(count=BATCH):
    return [images.png(i) for i in range(count)]


@pytest.fixture(scope="module")
def state_dict(tiny_checkpoint):
    return torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    env = {**CLEAN, "PRED_MODEL_PATH": tiny_checkpoint, "API_KEY": API_KEY}
    with run_gunicorn(tmp_path_factory.mktemp("oip"), env=env) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=30, network_timeout=60) as c:
        yield c




def auth():
    """The API key header; a fresh dict each call, as tritonclient adds its own headers to the one it gets."""
    return {"Authorization": f"Bearer {API_KEY}"}


def bytes_input(elements, binary=True):
    tensor = triton.InferInput("image", [len(elements)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return tensor


def fp32_input(batch, binary=True):
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch.numpy().astype(np.float32), binary_data=binary)
    return tensor


def multipart_predictions(server, pngs):
    files = [("image_file", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    response = requests.post(f"{server.url}/api/v1/model/predict", files=files, headers=auth(), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["data"]


# -- the real client against gunicorn -------------------------------------------------------------


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(NAME, headers=auth())
    assert not client.is_model_ready("another-model", headers=auth())
    metadata = client.get_server_metadata(headers=auth())
    assert metadata["name"] == "prediction-service"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_gives_inputs_outputs_and_the_served_version(client, tiny_checkpoint):
    metadata = client.get_model_metadata(NAME, headers=auth())
    run_id = tiny_checkpoint.parent.parent.name
    assert metadata["name"] == NAME
    assert metadata["versions"] == [run_id]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]} == {
        "image": ("BYTES", [-1]),
        "input": ("FP32", [-1, 1, 28, 28]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]),
        "label": ("BYTES", [-1]),
    }
    assert client.get_model_metadata(NAME, model_version=run_id, headers=auth())["name"] == NAME
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata(NAME, model_version="7", headers=auth())
    assert unknown.value.status() == "404"
    assert "version" in unknown.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_batch_of_16_preprocessed_fp32_inputs(client, state_dict, binary):
    batch = digit_batch(range(BATCH))
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
    result = client.infer(NAME, [fp32_input(batch, binary)], outputs=outputs, headers=auth(), request_id="req-7")
    expected = template_probabilities(state_dict, batch).numpy()
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (BATCH, 10)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert labels == [str(i) for i in expected.argmax(axis=1)]
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == NAME


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_batch_of_16_images_answers_as_the_multipart_api(client, server, binary):
    pngs = png_batch()
    elements = pngs if binary else [base64.b64encode(data).decode() for data in pngs]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
    result = client.infer(NAME, [bytes_input(elements, binary)], outputs=outputs, headers=auth())
    multipart = multipart_predictions(server, pngs)
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert labels == [p["prediction"] for p in multipart]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.max(axis=1) == pytest.approx([p["confidence"] for p in multipart], rel=1e-5)


def test_only_the_outputs_asked_for_come_back(client):
    result = client.infer(
        NAME, [bytes_input(png_batch(2))], outputs=[triton.InferRequestedOutput("label")], headers=auth()
    )
    assert result.as_numpy("probabilities") is None
    assert len(result.as_numpy("label")) == 2


def test_the_client_default_binary_outputs_and_version_path(client, tiny_checkpoint):
    run_id = tiny_checkpoint.parent.parent.name
    result = client.infer(NAME, [bytes_input(png_batch(3))], model_version=run_id, headers=auth())
    response = result.get_response()
    assert all("binary_data_size" in output["parameters"] for output in response["outputs"])
    assert result.as_numpy("probabilities").shape == (3, 10)


def test_unknown_model_and_missing_key_answer_in_the_protocol_shape(client):
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("another-model", [bytes_input(png_batch(1))], headers=auth())
    assert unknown.value.status() == "404"
    assert "digit_cnn" in unknown.value.message()
    with pytest.raises(InferenceServerException) as refused:
        client.infer(NAME, [bytes_input(png_batch(1))])
    assert refused.value.status() == "401"
    assert "API key" in refused.value.message()


def test_v2_requests_are_counted_and_carry_request_ids(client, server):
    client.infer(NAME, [bytes_input(png_batch(2))], headers=auth())
    response = requests.post(f"{server.url}/v2/models/{NAME}/infer", data=b"{", headers=auth(), timeout=10)
    assert response.status_code == 400
    assert response.headers["X-Request-ID"]
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert f'endpoint="/v2/models/<name>/infer",method="POST",status="200"' in metrics
    assert f'endpoint="/v2/models/<name>/infer",method="POST",status="400"' in metrics


# -- hostile requests, in process (a 500 would raise here) ----------------------------------------


@pytest.fixture
def v2(make_app):
    return make_app(MAX_FILES=16, MAX_IMAGE_PIXELS=64 * 64, MAX_CONTENT_LENGTH=1024 * 1024).test_client()


def fp32_json(shape, data=None, datatype="FP32", name="input"):
    count = int(np.prod(shape))
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data if data is not None else [0.0] * count}]}


def binary_request(header, payload, length=None):
    text = json.dumps(header).encode()
    length = len(text) if length is None else length
    return text + payload, {"Inference-Header-Content-Length": str(length)}


def length_prefixed(*elements):
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


PNG = images.png(0)
HOSTILE = {
    "not json": (b"{", {}),
    "json but not an object": (b"[1, 2]", {}),
    "no inputs": (json.dumps({"inputs": []}).encode(), {}),
    "unknown input": (json.dumps(fp32_json([1, 1, 28, 28], name="pixels")).encode(), {}),
    "two inputs": (json.dumps({"inputs": fp32_json([1, 1, 28, 28])["inputs"] + [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}]}).encode(), {}),
    "wrong datatype": (json.dumps(fp32_json([1, 1, 28, 28], datatype="INT64")).encode(), {}),
    "image as FP32": (json.dumps(fp32_json([1], name="image")).encode(), {}),
    "shape mismatch": (json.dumps(fp32_json([1, 1, 27, 28])).encode(), {}),
    "rank mismatch": (json.dumps(fp32_json([784])).encode(), {}),
    "empty batch": (json.dumps(fp32_json([0, 1, 28, 28], data=[])).encode(), {}),
    "over MAX_FILES": (json.dumps(fp32_json([17, 1, 28, 28])).encode(), {}),
    "negative dimension": (json.dumps(fp32_json([-1, 1, 28, 28], data=[0.0] * 784)).encode(), {}),
    "data shorter than shape": (json.dumps(fp32_json([2, 1, 28, 28], data=[0.0] * 784)).encode(), {}),
    "strings as FP32": (json.dumps(fp32_json([1, 1, 28, 28], data=["a"] * 784)).encode(), {}),
    "NaN": (json.dumps(fp32_json([1, 1, 28, 28], data=[float("nan")] * 784)).encode(), {}),
    "huge number": (json.dumps(fp32_json([1, 1, 28, 28])).replace("0.0", "1e999", 1).encode(), {}),
    "deep nesting": (b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", {}),
    "bytes not base64": (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["***"]}]}).encode(), {}),
    "bytes count mismatch": (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(PNG).decode()]}]}).encode(), {}),
    "not an image": (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"hello").decode()]}]}).encode(), {}),
    "image over MAX_IMAGE_PIXELS": (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
        "data": [base64.b64encode(encode(Image.new("L", (65, 64)))).decode()]}]}).encode(), {}),
    "unknown output": (json.dumps({**fp32_json([1, 1, 28, 28]), "outputs": [{"name": "logits"}]}).encode(), {}),
    "classification extension": (json.dumps({**fp32_json([1, 1, 28, 28]), "outputs": [{"name": "label", "parameters": {"classification": 3}}]}).encode(), {}),
    "binary_data not a boolean": (json.dumps({**fp32_json([1, 1, 28, 28]), "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}).encode(), {}),
    "header length not a number": (b"{}", {"Inference-Header-Content-Length": "ten"}),
    "header length past the body": binary_request({"inputs": []}, b"", length=4096),
    "sizes do not add up": binary_request(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 3136}}]},
        b"\0" * 3136 + b"extra"),
    "truncated binary section": binary_request(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 3136}}]},
        b"\0" * 3000),
    "binary size does not fit the shape": binary_request(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 3132}}]},
        b"\0" * 3132),
    "binary NaN": binary_request(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 3136}}]},
        np.full(784, np.nan, dtype="<f4").tobytes()),
    "binary and data together": binary_request(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784,
                     "parameters": {"binary_data_size": 3136}}]}, b"\0" * 3136),
    "negative binary size": binary_request(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": -4}}]}, b""),
    "BYTES length prefix cut short": binary_request(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 2}}]}, b"\x05\x00"),
    "BYTES element longer than the data": binary_request(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]},
        struct.pack("<I", 1000) + b"abcd"),
    "BYTES elements fewer than the shape": binary_request(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 4 + len(PNG)}}]},
        length_prefixed(PNG)),
    "BYTES elements more than the shape": binary_request(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8 + 2 * len(PNG)}}]},
        length_prefixed(PNG, PNG)),
    "gzip body": (b"\x1f\x8b\x08\x00", {"Content-Encoding": "gzip"}),
    "non-UTF-8 JSON": (b'{"id": "\xff"}', {}),
}


# What each refusal must say, so that every case fails for its own reason.
REASONS = {
    "not json": "not valid JSON", "json but not an object": "JSON object", "no inputs": "non-empty list",
    "unknown input": "unknown input", "two inputs": "one input", "wrong datatype": "datatype FP32",
    "image as FP32": "datatype BYTES", "shape mismatch": "[-1, 1, 28, 28]", "rank mismatch": "[-1, 1, 28, 28]",
    "empty batch": "MAX_FILES", "over MAX_FILES": "MAX_FILES", "negative dimension": "whole numbers",
    "data shorter than shape": "needs 1568", "strings as FP32": "numbers only", "NaN": "NaN",
    "huge number": "not finite", "deep nesting": "not valid JSON", "bytes not base64": "base64",
    "bytes count mismatch": "list of 2", "not an image": "not a decodable image",
    "image over MAX_IMAGE_PIXELS": "MAX_IMAGE_PIXELS", "unknown output": "unknown output",
    "classification extension": "classification", "binary_data not a boolean": "true or false",
    "header length not a number": "whole number", "header length past the body": "fit in the body",
    "sizes do not add up": "add up to 3136", "truncated binary section": "only 3000 bytes",
    "binary size does not fit the shape": "needs 3136", "binary NaN": "not finite",
    "binary and data together": "both", "negative binary size": "whole number",
    "BYTES length prefix cut short": "cut short", "BYTES element longer than the data": "says 1000 bytes",
    "BYTES elements fewer than the shape": "element 1", "BYTES elements more than the shape": "left after",
    "gzip body": "Content-Encoding", "non-UTF-8 JSON": "UnicodeDecodeError",
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_v2_requests_get_400_in_the_protocol_shape(v2, case):
    body, headers = HOSTILE[case]
    response = v2.post(f"/v2/models/{NAME}/infer", data=body, headers=headers)
    assert response.status_code == 400, response.get_data()[:300]
    assert response.is_json
    payload = response.get_json()
    assert list(payload) == ["error"], payload
    assert REASONS[case] in payload["error"]


def test_a_valid_binary_request_built_by_hand_passes(v2):
    """The hostile cases above fail for their own reason: the same request done right is answered."""
    body, headers = binary_request(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 8 + 2 * len(PNG)}}],
         "outputs": [{"name": "label", "parameters": {"binary_data": False}}]},
        length_prefixed(PNG, PNG))
    response = v2.post(f"/v2/models/{NAME}/infer", data=body, headers=headers)
    assert response.status_code == 200, response.get_data()
    assert response.get_json()["outputs"][0]["shape"] == [2]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", f"/v2/models/{NAME}/infer", 405), ("GET", "/v2/repository/index", 404), ("GET", "/v2/models/x", 404)],
)
def test_other_errors_under_v2_are_in_the_protocol_shape(v2, method, path, status):
    response = v2.open(path, method=method)
    assert response.status_code == status
    assert list(response.get_json()) == ["error"]


def test_errors_outside_v2_keep_the_api_shape(v2):
    response = v2.get("/api/v1/nowhere")
    assert response.status_code == 404
    assert response.get_json()["code"] == 404


def test_a_body_over_max_content_length_is_refused_in_the_protocol_shape(v2):
    response = v2.post(f"/v2/models/{NAME}/infer", data=b" " * (1024 * 1024 + 1))
    assert response.status_code == 413
    assert "MAX_CONTENT_LENGTH" in response.get_json()["error"]


def test_pred_model_name_names_the_model(make_app):
    client = make_app(PRED_MODEL_NAME="digits").test_client()
    assert client.get("/v2/models/digits").get_json()["name"] == "digits"
    assert client.get(f"/v2/models/{NAME}").status_code == 404


def test_the_protocol_is_in_the_openapi_spec(v2):
    spec = v2.get("/openapi.json").get_json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert set(infer["responses"]) >= {"200", "400", "401", "404", "413", "503"}
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
            "/v2/models/{name}/versions/{version}/infer"} <= set(spec["paths"])


def test_a_model_name_that_cannot_be_a_path_segment_stops_start_up():
    from config.settings import ConfigError, from_env

    assert from_env({"PRED_MODEL_NAME": "digits-v2"}).PRED_MODEL_NAME == "digits-v2"
    with pytest.raises(ConfigError, match="PRED_MODEL_NAME"):
        from_env({"PRED_MODEL_NAME": "digits/v2"})
