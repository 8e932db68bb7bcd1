"""Every endpoint and every error of the HTTP API, through the Flask test client; settings validation."""

import hashlib
import io
import json
import logging
import re
from datetime import datetime

import pytest
import torch
from flask import request
from werkzeug.test import EnvironBuilder

from config.settings import ConfigError, Settings, from_env, server_from_env
from service.schemas import PredictResponseSchema
from tests import images
from tests.support import digit_batch, template_probabilities

PREDICT = "/api/v1/model/predict"
VERSION = "/api/v1/model/version"
DIGITS = [str(d) for d in range(10)]


def upload(*parts):
    """A multipart body with one ``image_file`` part per (bytes, filename)."""
    return {"image_file": [(io.BytesIO(data), name) for data, name in parts]}


def digits(*indices):
    return upload(*[(images.png(i), f"digit-{i}.png") for i in indices])


@pytest.fixture
def expected(tiny_checkpoint):
    """The template network's probabilities for digits 0..5, computed without the service."""
    state_dict = torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"]
    return template_probabilities(state_dict, digit_batch(range(6)))


def assert_error(response, status):
    """flask-smorest's one error shape: JSON with code and status (and message or errors)."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/json"
    body = response.json
    assert body["code"] == status
    assert isinstance(body["status"], str) and body["status"]
    return body


# -- predict ------------------------------------------------------------------------------------


def test_predict_one_image_in_the_templates_shape(client, expected):
    response = client.post(PREDICT, data=digits(0), content_type="multipart/form-data")
    assert response.status_code == 200, response.json
    (item,) = response.json["data"]
    assert set(item) == {"image_filename", "prediction", "confidence"}
    assert item["image_filename"] == "digit-0.png"
    assert item["prediction"] == DIGITS[int(expected[0].argmax())]
    assert isinstance(item["prediction"], str)
    # Byte for byte the template's answer, then the confidence it lacked.
    prefix = f'{{"data":[{{"image_filename":"digit-0.png","prediction":"{item["prediction"]}","confidence":'
    assert response.get_data(as_text=True).startswith(prefix)


def test_confidence_is_the_softmax_probability_of_the_prediction(client, expected):
    (item,) = client.post(PREDICT, data=digits(3)).json["data"]
    assert item["confidence"] == pytest.approx(expected[3].max().item(), rel=1e-5)
    assert 0.0 < item["confidence"] <= 1.0


def test_predict_several_images_keeps_upload_order(client, expected):
    order = [4, 0, 5, 2, 1]
    response = client.post(PREDICT, data=upload(*[(images.png(i), f"upload-{n}-{i}.png") for n, i in enumerate(order)]))
    assert response.status_code == 200, response.json
    data = response.json["data"]
    assert [item["image_filename"] for item in data] == [f"upload-{n}-{i}.png" for n, i in enumerate(order)]
    for item, index in zip(data, order):
        assert item["prediction"] == DIGITS[int(expected[index].argmax())]
        assert item["confidence"] == pytest.approx(expected[index].max().item(), rel=1e-5)


def test_the_same_filename_twice_is_two_predictions(client):
    response = client.post(PREDICT, data=upload((images.png(0), "same.png"), (images.png(1), "same.png")))
    assert [item["image_filename"] for item in response.json["data"]] == ["same.png", "same.png"]


def test_all_images_of_a_request_go_through_one_forward_pass(app, client, monkeypatch):
    # loaded and warmed up: its warm-up pass is not counted
    classifier = app.extensions["model_registry"].get().classifier
    batches = []
    real_forward = classifier.forward

    def counting_forward(batch):
        batches.append(tuple(batch.shape))
        return real_forward(batch)

    monkeypatch.setattr(classifier, "forward", counting_forward)

    response = client.post(PREDICT, data=digits(0, 1, 2, 3, 4))

    assert response.status_code == 200
    assert batches == [(5, 1, 28, 28)]


@pytest.mark.parametrize("kind", sorted(images.VALID_KINDS))
def test_every_image_kind_is_accepted(client, kind):
    data, _ = images.VALID_KINDS[kind]()
    response = client.post(PREDICT, data=upload((data, f"upload.{kind}")))
    assert response.status_code == 200, response.json
    assert response.json["data"][0]["prediction"] in DIGITS


def test_filenames_are_echoed_as_sent_and_nothing_is_written_under_them(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "../../etc/passwd.png"
    response = client.post(PREDICT, data=upload((images.png(0), name)))
    assert response.json["data"][0]["image_filename"] == name
    assert list(tmp_path.iterdir()) == []


def test_uploads_stay_in_memory(app):
    # Werkzeug spools parts over 500 KB to a temporary file by default.
    big = b"\0" * (2 * 1024 * 1024)
    environ = EnvironBuilder(PREDICT, method="POST", data=upload((big, "big.png"))).get_environ()
    try:
        with app.request_context(environ):
            assert isinstance(request.files["image_file"].stream, io.BytesIO)
    finally:
        environ["wsgi.input"].close()  # the test client's own encoding of the body may be a file


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_adds_the_k_most_probable_labels(client, expected, k):
    response = client.post(PREDICT, data=digits(0, 2), query_string={"top_k": k})
    assert response.status_code == 200, response.json
    for item, index in zip(response.json["data"], (0, 2)):
        ranked = item["top_k"]
        assert len(ranked) == k
        probabilities = [entry["probability"] for entry in ranked]
        assert probabilities == sorted(probabilities, reverse=True)
        assert ranked[0] == {"label": item["prediction"], "probability": item["confidence"]}
        for entry in ranked:
            assert entry["probability"] == pytest.approx(expected[index][int(entry["label"])].item(), rel=1e-5)
        if k == len(DIGITS):
            assert sorted(entry["label"] for entry in ranked) == DIGITS
            assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("query", [{}, {"top_k": 3}])
def test_the_predict_body_is_exactly_what_its_documented_schema_gives(client, query):
    response = client.post(PREDICT, data=digits(0, 2), query_string=query)
    assert response.status_code == 200, response.json
    body = response.get_json()
    assert json.dumps(PredictResponseSchema().dump(body)) == json.dumps(body)
    assert PredictResponseSchema().validate(body) == {}


@pytest.mark.parametrize("k", [11, 10**30])
def test_a_top_k_over_the_number_of_labels_returns_them_all(client, k):
    response = client.post(PREDICT, data=digits(0), query_string={"top_k": k})
    assert response.status_code == 200, response.json
    assert sorted(entry["label"] for entry in response.json["data"][0]["top_k"]) == DIGITS


def test_other_form_fields_are_ignored_as_the_spec_allows(client):
    spec = client.get("/openapi.json").json
    upload = spec["components"]["schemas"]["Upload"]
    assert upload.get("additionalProperties", True) is True
    data = {**digits(0), "note": "hello", "other_file": (io.BytesIO(b"not an image"), "x.bin")}
    response = client.post(PREDICT, data=data)
    assert response.status_code == 200, response.json
    assert [item["image_filename"] for item in response.json["data"]] == ["digit-0.png"]


@pytest.mark.parametrize("k", ["0", "-1", "abc", "1.5", ""])
def test_top_k_out_of_range_or_not_a_whole_number_is_refused(client, k):
    body = assert_error(client.post(PREDICT, data=digits(0), query_string={"top_k": k}), 422)
    assert "top_k" in str(body.get("errors", "")) + body.get("message", "")


# -- version, health, docs ----------------------------------------------------------------------


def test_version_describes_the_served_model(client, tiny_checkpoint):
    response = client.get(VERSION)
    assert response.status_code == 200
    assert response.get_data(as_text=True).startswith('{"data":{"model_uuid":')
    data = response.json["data"]
    assert data["model_uuid"] == tiny_checkpoint.parts[-3]
    assert data["model_path"] == str(tiny_checkpoint)
    assert data["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert data["architecture"] == "digit_cnn"
    assert data["device"] == "cpu"
    assert data["labels"] == DIGITS
    assert data["input_shape"] == [1, 28, 28]
    assert datetime.fromisoformat(data["loaded_at"]).utcoffset() is not None


def test_liveness(client):
    response = client.get("/health/live")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_ready_only_once_the_model_is_loaded_and_warmed_up(client):
    before = client.get("/health/ready")
    assert before.status_code == 503
    assert before.json["status"] == "unavailable"
    assert before.json["reason"]

    assert client.post(PREDICT, data=digits(0)).status_code == 200  # loads and warms up on first use

    after = client.get("/health/ready")
    assert after.status_code == 200
    assert after.json == {"status": "ok"}


def test_a_model_that_cannot_load_is_503_everywhere_and_names_the_setting(make_app, tmp_path):
    client = make_app(PRED_MODEL_PATH=str(tmp_path / "gone.pt")).test_client()
    for response in (client.post(PREDICT, data=digits(0)), client.get(VERSION)):
        body = assert_error(response, 503)
        assert "PRED_MODEL_PATH" in body["message"] and "gone.pt" in body["message"]
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json == {"status": "unavailable", "reason": "the configured model cannot be loaded"}
    assert client.get("/health/live").status_code == 200


def test_readiness_shows_paths_and_upstream_errors_only_to_holders_of_the_api_key(make_app, tmp_path):
    client = make_app(PRED_MODEL_PATH=str(tmp_path / "gone.pt"), API_KEY="s3cret").test_client()
    client.post(PREDICT, data=digits(0), headers={"Authorization": "Bearer s3cret"})
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        anonymous = client.get("/health/ready", headers=headers)
        assert anonymous.status_code == 503
        assert anonymous.json == {"status": "unavailable", "reason": "the configured model cannot be loaded"}
        assert str(tmp_path) not in anonymous.get_data(as_text=True)
    keyed = client.get("/health/ready", headers={"Authorization": "Bearer s3cret"})
    assert keyed.status_code == 503 and keyed.json["reason"] == "the configured model cannot be loaded"
    assert "PRED_MODEL_PATH" in keyed.json["detail"] and str(tmp_path / "gone.pt") in keyed.json["detail"]


def test_openapi_spec_documents_the_api(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json
    assert spec["openapi"].startswith("3.")
    assert {"/api/v1/model/predict", "/api/v1/model/version", "/health/live", "/health/ready"} <= set(spec["paths"])
    predict = spec["paths"][PREDICT]["post"]
    assert predict["summary"] and predict["description"]
    body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in body:
        body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert "image_file" in body["required"]
    assert body["properties"]["image_file"]["type"] == "array"
    assert body["properties"]["image_file"]["items"] == {"type": "string", "format": "binary", "minLength": 1}
    assert [p["name"] for p in predict["parameters"] if p["in"] == "query"] == ["top_k"]
    assert {"200", "413", "422"} <= set(predict["responses"])
    assert "X-Model-Version" in predict["responses"]["200"]["headers"]
    assert "200" in spec["paths"][VERSION]["get"]["responses"]
    # Nothing paginates: no pagination schema or header left in the spec by the framework.
    assert "PaginationMetadata" not in spec["components"].get("schemas", {})
    assert "PAGINATION" not in spec["components"].get("headers", {})


def test_swagger_ui_is_served_with_local_assets_only(client):
    page = client.get("/swagger-ui")
    assert page.status_code == 200
    assert page.content_type.startswith("text/html")
    html = page.get_data(as_text=True)
    assert "SwaggerUIBundle" in html
    assert not re.search(r"(https?:)?//[a-z0-9]", html, re.IGNORECASE), "no external URL in the page"
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    assert any(a.endswith("swagger-ui.css") for a in assets)
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert len(served.data) > 1000, asset
        kind = "javascript" if asset.endswith(".js") else "css"
        assert kind in served.content_type, (asset, served.content_type)
        served.close()
    spec_url = re.search(r"""url:\s*["']([^"']+)["']""", html).group(1)
    assert client.get(spec_url).status_code == 200


# -- errors -------------------------------------------------------------------------------------


def test_no_image_file_is_422(client):
    body = assert_error(client.post(PREDICT, data={}, content_type="multipart/form-data"), 422)
    assert "image_file" in body["errors"]["files"]
    assert body["message"] == (
        "no image_file: the multipart request has no fields; send each image as multipart field image_file"
    )


@pytest.mark.parametrize(
    ("data", "arrived"),
    [
        ({"file": (io.BytesIO(images.png(0)), "0.png")}, "the file field 'file'"),
        ({"image": (io.BytesIO(images.png(0)), "0.png"), "note": "x"},
         "the file field 'image' and the text field 'note' (no filename)"),
        ({"a": (io.BytesIO(b"1"), "a.png"), "b": (io.BytesIO(b"2"), "b.png")}, "the file fields 'a', 'b'"),
    ],
    ids=["file", "image-and-a-text-field", "two-files"],
)
def test_a_misnamed_field_is_422_naming_what_arrived_and_what_it_must_be_called(client, data, arrived):
    body = assert_error(client.post(PREDICT, data=data, content_type="multipart/form-data"), 422)
    assert "image_file" in body["errors"]["files"]
    assert body["message"] == f"no image_file: the request has {arrived}; send each image as multipart field image_file"


def test_a_file_sent_as_text_is_told_how_to_send_it_as_a_file(client):
    # curl -F image_file=digit.png (without the @) sends the name as text.
    body = assert_error(client.post(PREDICT, data={"image_file": "digit.png"}, content_type="multipart/form-data"), 422)
    assert body["message"] == (
        "no image_file: the request has the text field 'image_file' (no filename); send each image as multipart "
        "field image_file (with curl: -F image_file=@<path>)"
    )


def test_the_names_shown_are_few_and_short(client):
    data = {f"field-{n}-" + "x" * 100: (io.BytesIO(b"1"), f"{n}.png") for n in range(8)}
    message = assert_error(client.post(PREDICT, data=data, content_type="multipart/form-data"), 422)["message"]
    assert "'field-0-" + "x" * 32 + "…'" in message and "field-4-" in message and "field-5-" not in message
    assert "and 3 more;" in message and len(message) < 400


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (images.text_as_png(), "not a decodable image"),
        (images.truncated(images.png(0)), "truncated"),
        (b"", "empty"),
    ],
    ids=["text", "truncated", "zero-bytes"],
)
def test_a_part_that_is_not_an_image_is_422_naming_the_file(client, content, problem):
    response = client.post(PREDICT, data=upload((images.png(0), "fine.png"), (content, "broken-upload.png")))
    body = assert_error(response, 422)
    assert "broken-upload.png" in body["message"] and problem in body["message"]
    assert "fine.png" not in body["message"]
    assert any("broken-upload.png" in line for line in body["errors"]["files"]["image_file"])


def test_a_body_over_max_content_length_is_413(make_app):
    client = make_app(MAX_CONTENT_LENGTH=4096).test_client()
    assert client.post(PREDICT, data=digits(0)).status_code == 200  # a digit is well under 4 KiB
    assert_error(client.post(PREDICT, data=upload((b"\x89PNG" + b"\0" * 8192, "big.png"))), 413)


def test_max_content_length_from_the_environment_is_enforced(monkeypatch, make_app):
    monkeypatch.setenv("MAX_CONTENT_LENGTH", "2k")
    app = make_app()
    assert app.config["MAX_CONTENT_LENGTH"] == 2048
    assert_error(app.test_client().post(PREDICT, data=upload((b"\0" * 4096, "big.png"))), 413)


def test_more_than_max_files_is_422(make_app):
    client = make_app(MAX_FILES=3).test_client()
    assert client.post(PREDICT, data=digits(0, 1, 2)).status_code == 200
    body = assert_error(client.post(PREDICT, data=digits(0, 1, 2, 3)), 422)
    assert "MAX_FILES" in body["message"] and "4" in body["message"]


def test_the_default_max_files_is_64(client):
    assert client.post(PREDICT, data=upload(*[(images.png(0), f"{n}.png") for n in range(64)])).status_code == 200
    assert_error(client.post(PREDICT, data=upload(*[(images.png(0), f"{n}.png") for n in range(65)])), 422)


def test_a_decompression_bomb_is_422(client):
    body = assert_error(client.post(PREDICT, data=upload((images.bomb_png(), "bomb.png"))), 422)
    assert "bomb.png" in body["message"] and "MAX_IMAGE_PIXELS" in body["message"]


def test_max_image_pixels_is_configurable(make_app):
    client = make_app(MAX_IMAGE_PIXELS=28 * 28 - 1).test_client()
    assert "MAX_IMAGE_PIXELS" in assert_error(client.post(PREDICT, data=digits(0)), 422)["message"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ('{"image_file": "aGVsbG8="}', "application/json"),
        (images.png(0), "image/png"),
        ("image_file=digit.png", "application/x-www-form-urlencoded"),
        ("", None),
    ],
    ids=["json", "raw-image", "urlencoded", "no-body"],
)
def test_a_body_that_is_not_multipart_is_refused(client, body, content_type):
    response = client.post(PREDICT, data=body, content_type=content_type)
    message = assert_error(response, 422)["message"]
    sent = f"the request body is {content_type}, not multipart/form-data" if content_type else "the request has no body"
    assert message.startswith(f"no image_file: {sent}; send each image as multipart field image_file"), message


def test_unknown_paths_and_methods_are_json(client):
    assert_error(client.get("/api/v1/model/nothing"), 404)
    assert_error(client.get(PREDICT), 405)


def test_an_unexpected_error_is_a_json_500_and_its_traceback_is_logged(make_app, monkeypatch, caplog):
    app = make_app(PROPAGATE_EXCEPTIONS=False)  # as in production: TESTING would re-raise it here
    client = app.test_client()
    classifier = app.extensions["model_registry"].get().classifier

    def broken_forward(batch):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(classifier, "forward", broken_forward)
    caplog.set_level(logging.ERROR)

    response = client.post(PREDICT, data=digits(0))

    body = assert_error(response, 500)
    assert "secret internal detail" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
    assert logged, "the 500's traceback must be logged"
    assert "secret internal detail" in str(logged[0].exc_info[1])
    assert body["status"] == "Internal Server Error"


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("USE_CUDA", "maybe"),
        ("USE_MPS", "2"),
        ("VERIFY_MODEL_ON_START", "perhaps"),
        ("MAX_CONTENT_LENGTH", "lots"),
        ("MAX_CONTENT_LENGTH", "0"),
        ("MAX_CONTENT_LENGTH", "-5"),
        ("MAX_CONTENT_LENGTH", "16 parsecs"),
        ("MAX_FILES", "abc"),
        ("MAX_FILES", "0"),
        ("MAX_FILES", "-1"),
        ("MAX_FILES", "2.5"),
        ("MAX_IMAGE_PIXELS", "many"),
        ("MAX_IMAGE_PIXELS", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("PRED_MODEL_URI", "http://example.com/model.pt"),
        ("CORS_ORIGINS", "*"),
    ],
)
def test_each_bad_setting_is_a_config_error_naming_it(variable, value):
    with pytest.raises(ConfigError) as caught:
        from_env({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: "), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WEB_CONCURRENCY", "0"),
        ("WEB_CONCURRENCY", "two"),
        ("PORT", "70000"),
        ("PORT", "http"),
        ("TORCH_NUM_THREADS", "x"),
        ("GUNICORN_TIMEOUT", "-5"),
    ],
)
def test_each_bad_server_setting_is_a_config_error_naming_it(variable, value):
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        server_from_env({variable: value}, cpu_count=2)


def test_a_model_path_and_a_model_uri_together_are_refused():
    with pytest.raises(ConfigError, match="^PRED_MODEL_URI: set either PRED_MODEL_PATH or PRED_MODEL_URI"):
        from_env({"PRED_MODEL_PATH": "/models/a/model/model.pt", "PRED_MODEL_URI": "runs:/a/model/model.pt"})


def test_settings_defaults():
    settings = from_env({})
    assert settings.PRED_MODEL_PATH is None and settings.PRED_MODEL_UUID is None
    assert settings.USE_CUDA is False and settings.USE_MPS is False
    assert settings.MAX_CONTENT_LENGTH == 16 * 1024 * 1024
    assert settings.MAX_FILES == 64
    assert settings.MAX_IMAGE_PIXELS == Settings.MAX_IMAGE_PIXELS
    assert settings.LOG_LEVEL == "INFO"


@pytest.mark.parametrize(
    ("raw", "size"), [("1048576", 1048576), ("16MiB", 16 * 1024**2), ("512k", 512 * 1024), ("2 GB", 2 * 1024**3)]
)
def test_sizes_take_units(raw, size):
    assert from_env({"MAX_CONTENT_LENGTH": raw}).MAX_CONTENT_LENGTH == size


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False)])
def test_flags(raw, value):
    settings = from_env({"USE_CUDA": raw, "USE_MPS": raw})
    assert settings.USE_CUDA is value and settings.USE_MPS is value


def test_a_relative_model_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert from_env({"PRED_MODEL_PATH": "models/abc/model/model.pt"}).PRED_MODEL_PATH == str(
        tmp_path / "models/abc/model/model.pt"
    )


@pytest.mark.parametrize(("cores", "workers", "threads"), [(2, 2, 1), (1, 2, 1), (16, 4, 4), (8, 3, 2)])
def test_torch_threads_default_to_cores_per_worker(cores, workers, threads):
    server = server_from_env({"WEB_CONCURRENCY": str(workers)}, cpu_count=cores)
    assert server.workers == workers
    assert server.torch_threads == threads


def test_server_defaults():
    server = server_from_env({}, cpu_count=2)
    assert (server.port, server.workers, server.timeout) == (8080, 2, 90)
    assert server_from_env({"TORCH_NUM_THREADS": "3"}, cpu_count=2).torch_threads == 3


def test_a_bad_setting_stops_the_app_factory(monkeypatch, make_app):
    monkeypatch.setenv("MAX_FILES", "abc")
    with pytest.raises(ConfigError, match="^MAX_FILES: "):
        make_app()
