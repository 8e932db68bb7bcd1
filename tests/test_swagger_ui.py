"""Swagger UI in a real headless Chromium against real gunicorn, with every off-host request blocked."""

import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from service.images import decode_image
from service.formats import read_model
from tests import images
from tests.support import SERVICE_VARIABLES, run_gunicorn

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Nothing is downloaded: Debian's Chromium, with everything that phones home switched off.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    env = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
    env["PRED_MODEL_PATH"] = tiny_checkpoint
    with run_gunicorn(tmp_path_factory.mktemp("gunicorn"), env=env, workers=1) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: apt-get install chromium (make test does)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def offline_page(browser, server):
    """A page that may reach the server and nothing else, and the list of what else it tried."""
    server_host = urlsplit(server.url).netloc
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    blocked = []

    def only_the_server(route):
        parts = urlsplit(route.request.url)
        if parts.scheme in ("http", "https") and parts.netloc == server_host:
            route.continue_()
        elif parts.scheme in ("data", "blob"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    yield page, blocked
    context.close()


def test_swagger_ui_predicts_an_uploaded_png_offline(offline_page, server, tiny_checkpoint, tmp_path):
    page, blocked = offline_page
    picture = tmp_path / "seven.png"
    picture.write_bytes(images.png(7))
    classifier, _ = read_model(tiny_checkpoint.read_bytes())
    (expected,) = classifier.predict([decode_image(picture.read_bytes(), picture.name, 10**8)])

    page.goto(f"{server.url}/swagger-ui")
    operation = page.locator(".opblock-post", has=page.locator(".opblock-summary-path", has_text="/api/v1/model/predict"))
    operation.locator(".opblock-summary").click()
    assert "Classify one or more images" in operation.inner_text()
    operation.get_by_role("button", name="Try it out").click()
    # image_file is an array of files: its first file chooser is there at once, with no
    # "Add string item" click first.
    choosers = operation.locator("input[type=file]")
    choosers.first.wait_for(timeout=5000)
    assert choosers.count() == 1
    choosers.first.set_input_files(str(picture))
    operation.get_by_role("button", name="Execute").click()

    live = operation.locator(".live-responses-table")
    live.locator(".response-col_status").first.wait_for()
    status = live.locator("tbody .response-col_status").first.inner_text().strip()
    body = json.loads(live.locator(".response-col_description pre.microlight").first.inner_text())
    page.screenshot(path=str(tmp_path / "swagger-ui.png"), full_page=True)

    assert status == "200", body
    (item,) = body["data"]
    assert item["image_filename"] == "seven.png"
    assert item["prediction"] == expected.label
    assert item["confidence"] == pytest.approx(expected.confidence, rel=1e-4)
    assert blocked == [], "Swagger UI tried to reach the internet"


def test_swagger_ui_lists_every_operation_offline(offline_page, server):
    page, blocked = offline_page
    page.goto(f"{server.url}/swagger-ui")
    page.locator(".opblock-summary-path").first.wait_for()
    paths = {text.strip() for text in page.locator(".opblock-summary-path").all_inner_texts()}
    assert {"/api/v1/model/predict", "/api/v1/model/version", "/health/live", "/health/ready"} <= paths
    assert page.locator(".opblock-post .opblock-summary-path", has_text="/api/v1/model/predict").count() == 1
    page.wait_for_load_state("networkidle")
    assert blocked == [], "Swagger UI tried to reach the internet"
