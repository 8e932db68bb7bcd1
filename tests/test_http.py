"""How the app reads bodies and writes answers, whatever the route: form limits named in the
answer, and headers every response carries."""

import io

import pytest

from tests import images
from tests.support import multipart_body

PREDICT = "/api/v1/model/predict"


def post_parts(client, parts):
    body, content_type = multipart_body(parts)
    return client.post(PREDICT, data=body, headers={"Content-Type": content_type})


def test_a_form_of_too_many_parts_gets_a_422_saying_so(client):
    image = (b"image_file", b"d.png", images.png())
    assert post_parts(client, [image] + [(b"f", None, b"x")] * 999).status_code == 200  # 1000 parts
    response = post_parts(client, [image] + [(b"f", None, b"x")] * 1000)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert "more than 1000 parts" in response.json["message"] and "MAX_FILES" in response.json["message"]


def test_a_large_text_field_gets_a_422_saying_so(client):
    image = (b"image_file", b"d.png", images.png())
    assert post_parts(client, [image, (b"note", None, b"x" * 1000)]).status_code == 200
    response = post_parts(client, [image, (b"image_file", None, b"x" * 600_000)])
    assert response.status_code == 422, response.get_data(as_text=True)
    assert "larger than 500000 bytes" in response.json["message"]


def test_a_body_over_max_content_length_is_still_a_413(make_app):
    client = make_app(MAX_CONTENT_LENGTH=10_000).test_client()
    response = post_parts(client, [(b"image_file", b"d.png", images.png())] + [(b"f", None, b"x")] * 1000)
    assert response.status_code == 413 and "MAX_CONTENT_LENGTH" in response.json["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health/live"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/swagger-ui"),
     ("GET", "/swagger-ui/assets/swagger-ui.css"), ("GET", "/nowhere"), ("DELETE", "/health/live"),
     ("POST", PREDICT)],
)
def test_every_response_forbids_content_sniffing(client, method, path):
    response = client.open(path, method=method)
    assert response.headers["X-Content-Type-Options"] == "nosniff", (response.status_code, dict(response.headers))


def test_answers_keep_the_schema_order_of_keys(client):
    response = client.post(PREDICT, data={"image_file": [(io.BytesIO(images.png()), "d.png")]})
    assert response.get_data(as_text=True).startswith('{"data":[{"image_filename":"d.png","prediction":')


def test_the_app_looks_at_each_view_once_for_whether_it_is_a_coroutine(make_app, monkeypatch):
    import service.http

    looked_at = []
    real = service.http.iscoroutinefunction
    monkeypatch.setattr(service.http, "iscoroutinefunction", lambda func: looked_at.append(func) or real(func))
    client = make_app().test_client()

    for _ in range(3):
        assert client.get("/api/v1/model/version").status_code == 200

    assert looked_at, "the app did not ask"
    assert len(looked_at) == len(set(looked_at))  # each hook, view and decorator layer once


def test_the_app_keeps_a_bounded_number_of_those_answers(make_app):
    app = make_app()
    kept = app._SYNC_VIEWS_KEPT
    made_per_call = [lambda: None for _ in range(kept + 10)]

    for func in made_per_call:
        assert app.ensure_sync(func) is func

    assert len(app._sync_views) <= kept
