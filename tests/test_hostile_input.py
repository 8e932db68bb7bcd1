"""Hostile and odd uploads against real gunicorn.

Each case is answered with a JSON 4xx (or, for the odd but valid images, a 200 and a sensible
prediction); after each one the same workers answer the next good request, and no upload or
filename ever reaches the disk.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import psutil
import pytest
import requests

from config.settings import Settings
from tests import images
from tests.support import ROOT, SERVICE_VARIABLES, multipart_body, run_gunicorn, wait_for_workers

pytestmark = pytest.mark.slow

MAX_CONTENT_LENGTH = 60_000  # small, so a body just over it is cheap; the bomb below still fits
MAX_FILES = 4
LABELS = [str(d) for d in range(10)]
# In every odd filename: a file or directory by that name anywhere would mean a name was used as a path.
TOKEN = f"hostile-{uuid4().hex[:12]}"


def files(*parts, field_name="image_file"):
    """requests' keyword arguments for a multipart upload of (filename, data) parts."""
    return {"files": [(field_name, (name, data)) for name, data in parts]}


def raw(*parts):
    """requests' keyword arguments for a multipart body built byte for byte from (name, filename, data)."""
    body, content_type = multipart_body(parts)
    return {"data": body, "headers": {"Content-Type": content_type}}


def body_of_size(total):
    """A valid upload padded with a form field to exactly ``total`` bytes."""
    image = (b"image_file", b"digit.png", images.png())
    body, _ = multipart_body([image, (b"padding", None, b"")])
    body, content_type = multipart_body([image, (b"padding", None, b"x" * (total - len(body)))])
    assert len(body) == total
    return body, content_type


def many_parts(count):
    """A body of ``count`` one-byte text fields, each part as short as multipart allows."""
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    return {"data": part * count + b"--b--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=b"}}


def sized(total):
    body, content_type = body_of_size(total)
    return {"data": body, "headers": {"Content-Type": content_type}}


def sized_chunked(total):
    """The same body with no Content-Length: sent chunked, the limit must hold while reading."""
    body, content_type = body_of_size(total)
    return {"data": (body[i : i + 4096] for i in range(0, len(body), 4096)), "headers": {"Content-Type": content_type}}


@dataclass(frozen=True)
class Rejected:
    """An upload the service must refuse with ``status`` and a JSON error mentioning ``says``."""

    name: str
    request: object  # () -> requests.post keyword arguments
    status: int
    says: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    """An odd upload the service must classify; ``label`` is the true digit, when there is one."""

    name: str
    request: object
    filename: str
    label: str | None
    params: dict = field(default_factory=dict)


def _png():
    return images.png()


REJECTED = [
    Rejected("empty body", lambda: {}, 422, "image_file"),
    Rejected("wrong field name", lambda: files(("digit.png", _png()), field_name="image"), 422, "image_file"),
    Rejected("JSON body instead of multipart", lambda: {"json": {"image_file": "iVBORw0KGgo="}}, 422, "image_file"),
    Rejected("zero-byte file", lambda: files(("empty.png", b"")), 422, "the file is empty"),
    Rejected("text renamed .png", lambda: files(("notes.png", images.text_as_png())), 422, "not a decodable image"),
    Rejected("truncated PNG", lambda: files(("cut.png", images.truncated(_png()))), 422, "cut.png"),
    Rejected("truncated JPEG", lambda: files(("cut.jpg", images.truncated(images.jpeg()))), 422, "cut.jpg"),
    Rejected("20000x20000 PNG bomb", lambda: files(("bomb.png", images.bomb_png())), 422, "MAX_IMAGE_PIXELS"),
    Rejected("ICO holding a 20000x20000 PNG", lambda: files(("bomb.ico", images.ico_bomb(20000))), 422, "MAX_IMAGE_PIXELS"),
    Rejected("TIFF with a 46336x46336 tile", lambda: files(("tile.tiff", images.tiff_tile_bomb())), 422, "MAX_IMAGE_PIXELS"),
    Rejected("float TIFF of NaN", lambda: files(("nan.tiff", images.float_tiff(float("nan")))), 422, "not finite"),
    Rejected("float TIFF of infinity", lambda: files(("inf.tiff", images.float_tiff(float("inf")))), 422, "not finite"),
    Rejected("body one byte over MAX_CONTENT_LENGTH", lambda: sized(MAX_CONTENT_LENGTH + 1), 413, "Too Large"),
    Rejected("chunked body one byte over", lambda: sized_chunked(MAX_CONTENT_LENGTH + 1), 413, "Too Large"),
    Rejected("MAX_FILES + 1 files", lambda: files(*[("d.png", _png())] * (MAX_FILES + 1)), 422, "MAX_FILES"),
    Rejected("1,001 parts", lambda: many_parts(1001), 422, "more than 1000 parts"),
    Rejected(
        "non-UTF-8 filename",
        lambda: raw((b"image_file", b"\xff\xfe" + TOKEN.encode() + b"\xe9.png", _png())),
        400,
        "UTF-8",
    ),
    Rejected(
        "multipart without boundary",
        lambda: {"data": b"x", "headers": {"Content-Type": "multipart/form-data"}},
        400,
        "boundary",
    ),
    Rejected(
        "10 KB filename on a non-image",
        lambda: files(("x" * 10_240 + TOKEN + ".png", images.text_as_png())),
        422,
        "not a decodable image",
    ),
    Rejected("top_k=0", lambda: files(("d.png", _png())), 422, "top_k", {"top_k": "0"}),
    Rejected("top_k=-1", lambda: files(("d.png", _png())), 422, "top_k", {"top_k": "-1"}),
    Rejected("top_k not an integer", lambda: files(("d.png", _png())), 422, "top_k", {"top_k": "three"}),
    Rejected("top_k a fraction", lambda: files(("d.png", _png())), 422, "top_k", {"top_k": "1.5"}),
]

_DIGIT = images.digit_png(0)[1]
_NUL_NAME = f"a\x00{TOKEN}.png"
_LONG_NAME = "n" * 10_240 + TOKEN + ".png"

ACCEPTED = [
    Accepted("animated GIF", lambda: files(("a.gif", images.animated_gif())), "a.gif", _DIGIT),
    Accepted("CMYK JPEG", lambda: files(("c.jpg", images.cmyk_jpeg())), "c.jpg", _DIGIT),
    Accepted("16-bit PNG", lambda: files(("w.png", images.png_16bit())), "w.png", _DIGIT),
    Accepted(
        "palette PNG with transparency",
        lambda: files(("p.png", images.palette_png_with_transparency())),
        "p.png",
        _DIGIT,
    ),
    Accepted("EXIF-rotated JPEG", lambda: files(("r.jpg", images.exif_rotated_jpeg())), "r.jpg", _DIGIT),
    Accepted("1x1 image", lambda: files(("dot.png", images.one_pixel_png())), "dot.png", None),
    Accepted("body exactly MAX_CONTENT_LENGTH", lambda: sized(MAX_CONTENT_LENGTH), "digit.png", _DIGIT),
    Accepted("chunked body exactly MAX_CONTENT_LENGTH", lambda: sized_chunked(MAX_CONTENT_LENGTH), "digit.png", _DIGIT),
    Accepted("MAX_FILES files", lambda: files(*[("d.png", _png())] * MAX_FILES), "d.png", _DIGIT),
    Accepted("top_k = number of labels", lambda: files(("d.png", _png())), "d.png", _DIGIT, {"top_k": "10"}),
    Accepted("top_k over the number of labels", lambda: files(("d.png", _png())), "d.png", _DIGIT, {"top_k": "11"}),
    Accepted("top_k huge", lambda: files(("d.png", _png())), "d.png", _DIGIT, {"top_k": str(10**30)}),
    Accepted(
        "filename with ../",
        lambda: raw((b"image_file", f"../../{TOKEN}.png".encode(), _png())),
        f"../../{TOKEN}.png",
        _DIGIT,
    ),
    Accepted(
        "absolute filename",
        lambda: raw((b"image_file", f"/tmp/{TOKEN}.png".encode(), _png())),
        f"/tmp/{TOKEN}.png",
        _DIGIT,
    ),
    Accepted("filename with NUL", lambda: raw((b"image_file", _NUL_NAME.encode(), _png())), _NUL_NAME, _DIGIT),
    Accepted("10 KB filename", lambda: raw((b"image_file", _LONG_NAME.encode(), _png())), _LONG_NAME, _DIGIT),
]


@dataclass
class Service:
    url: str
    log: object
    private_tmp: Path
    workers: set


@pytest.fixture(scope="module")
def service(tmp_path_factory, trained_checkpoint):
    """gunicorn serving a model trained on real digits, so a sensible prediction is the right digit."""
    root = tmp_path_factory.mktemp("hostile")
    private_tmp = root / "tmp"
    private_tmp.mkdir()
    env = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
    env.update(
        PRED_MODEL_PATH=trained_checkpoint,
        MAX_CONTENT_LENGTH=MAX_CONTENT_LENGTH,
        MAX_FILES=MAX_FILES,
        # Whatever the workers would write to a temporary file would land here.
        TMPDIR=private_tmp,
        PROMETHEUS_MULTIPROC_DIR=root / "metrics",
    )
    with run_gunicorn(root, env=env) as server:
        yield Service(server.url, server.log, private_tmp, wait_for_workers(server.process, 2))


def post(service, request, params=None):
    return requests.post(f"{service.url}/api/v1/model/predict", params=params, timeout=30, **request)


def assert_still_serving(service):
    """The next good request is answered, by the same workers: none crashed and was replaced."""
    response = post(service, files(("digit.png", _png())))
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["prediction"] == _DIGIT
    server = psutil.Process(next(iter(service.workers))).parent()
    assert {child.pid for child in server.children()} == service.workers


@pytest.mark.parametrize("case", REJECTED, ids=lambda case: case.name)
def test_hostile_upload_gets_a_json_error(service, case):
    response = post(service, case.request(), case.params)
    assert response.status_code == case.status, response.text[:500]
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"  # filenames are echoed: never sniffed as HTML
    assert response.headers["X-Request-ID"]
    body = response.json()
    assert body["code"] == case.status
    assert case.says in f"{body['status']} {body.get('message', '')} {body.get('errors', '')}", body
    assert len(response.content) < 2_000  # a 10 KB filename is not echoed in full into an error
    assert_still_serving(service)


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda case: case.name)
def test_odd_but_valid_upload_gets_a_sensible_prediction(service, case):
    response = post(service, case.request(), case.params)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    predictions = response.json()["data"]
    for item in predictions:
        assert item["image_filename"] == case.filename  # echoed as sent, in JSON, never as a path
        assert item["prediction"] in LABELS
        assert 0.0 <= item["confidence"] <= 1.0
        if "top_k" in case.params:
            assert [p["label"] for p in item["top_k"]][0] == item["prediction"]
            assert sorted(p["label"] for p in item["top_k"]) == LABELS
        if case.label is not None:
            assert item["prediction"] == case.label
    assert_still_serving(service)


BOMBS = [case for case in REJECTED if "MAX_IMAGE_PIXELS" in case.says]
# The documented bound on what one upload adds to a worker's peak memory (README,
# MAX_IMAGE_PIXELS): four bitmaps of the largest image at 4 bytes a pixel, plus a margin.
PEAK_BOUND = 4 * 4 * Settings.MAX_IMAGE_PIXELS + 64 * 2**20


def _memory(pid, field):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.parametrize("case", BOMBS, ids=lambda case: case.name)
def test_a_bomb_leaves_the_workers_peak_memory_within_the_bound(service, case):
    before = {}
    for pid in service.workers:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the kernel resets the peak to the current size
        before[pid] = _memory(pid, "VmRSS")
    assert post(service, case.request(), case.params).status_code == 422
    growth = max(_memory(pid, "VmHWM") - before[pid] for pid in service.workers)
    assert growth <= PEAK_BOUND, f"a worker's peak memory grew by {growth / 2**20:.0f} MiB"


def test_no_upload_or_filename_reached_the_disk(service):
    """After the odd filenames (sent again here): no file by any of those names, nothing spooled."""
    for case in [*REJECTED, *ACCEPTED]:
        if "filename" in case.name:
            assert post(service, case.request(), case.params).status_code in (200, 400, 422)
    assert list(service.private_tmp.iterdir()) == []
    places = [Path("/tmp"), ROOT, Path("/"), ROOT.parent]
    found = []
    for place in places:
        for directory, dirnames, filenames in os.walk(place):
            dirnames[:] = [d for d in dirnames if d not in {".git", ".venv", "proc", "sys", "dev"}]
            found += [os.path.join(directory, n) for n in dirnames + filenames if TOKEN in n]
            if place in (Path("/"), ROOT.parent):
                break  # only their top level: that is where ../ would lead
    assert found == []


def test_the_hostile_requests_left_no_error_in_the_log(service):
    log = service.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]
