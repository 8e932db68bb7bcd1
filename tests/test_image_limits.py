"""What one upload may cost: memory and CPU bounds of decoding, and finite numbers only.

The memory test decodes each case in a fresh Python process, as a worker does (the service's
own Classifier.prepare), and reads that process's peak resident memory from the kernel, reset
before each case: a decoder that allocates a bomb's bitmap shows in it whether or not the
request is refused afterwards.
"""

import io
import json
import math
import subprocess
import sys

import pytest
import torch

from config.settings import Settings
from service.images import REQUEST_PIXELS_FACTOR, ImageError, PixelBudget, decode_image
from service.preprocess import InputSpec, preprocess
from tests import images
from tests.support import ROOT, encode

PREDICT = "/api/v1/model/predict"
MAX_PIXELS = Settings.MAX_IMAGE_PIXELS  # the default: 4096x4096
# The documented bound (README, MAX_IMAGE_PIXELS): four bitmaps of the largest image at 4 bytes
# a pixel, plus a fixed margin for the decoders' own buffers.
BOUND = 4 * 4 * MAX_PIXELS + 32 * 2**20

# Built in the child process by name (bytes of a bomb do not travel well on a command line).
BOMBS = {
    "ICO of 16x16 holding a 20000x20000 PNG": "images.ico_bomb(20000)",
    "163-byte TIFF with a 46336x46336 tile": "images.tiff_tile_bomb()",
    "TIFF with a real 24576x24576 deflate tile": "images.tiff_tile_bomb(24576, real=True)",
    "GIF of 16x16 whose first frame is 20000x20000": "images.gif_frame_bomb(20000)",
}
SIDE = int(math.isqrt(MAX_PIXELS))
LARGEST = {
    "RGBA PNG": f"images.flat_png('RGBA', {SIDE})",
    "palette PNG with transparency": f"images.flat_png('P', {SIDE}, transparency=0)",
    "16-bit PNG": f"images.flat_png('I;16', {SIDE})",
    "float TIFF": f"encode(Image.new('F', ({SIDE}, {SIDE}), 0.5), 'TIFF')",
    "lossless WebP": f"encode(Image.new('RGBA', ({SIDE}, {SIDE}), (9, 9, 9, 9)), 'WEBP', lossless=True)",
    "progressive CMYK JPEG": f"encode(Image.new('CMYK', ({SIDE}, {SIDE}), 9), 'JPEG', progressive=True)",
}

CHILD = """
import json, re, sys
from PIL import Image
from config.settings import Settings
from service.images import ImageError, PixelBudget
from service.inference import Classifier
from tests import images
from tests.support import encode
import torch

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

classifier = Classifier(torch.nn.Identity(), tuple("0123456789"))
classifier.prepare(images.png(), "warm-up.png", {max_pixels})
results = {{}}
for name, source in json.loads(sys.argv[1]).items():
    data = eval(source)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current resident size
    before = kib("VmRSS")
    try:
        classifier.prepare(data, name, {max_pixels}, PixelBudget({max_pixels}))
        outcome = "accepted"
    except ImageError as exc:
        outcome = str(exc)
    results[name] = {{"outcome": outcome, "growth": (kib("VmHWM") - before) * 1024}}
    del data
print(json.dumps(results))
"""


def peak_growth(cases):
    """Decode each case in one fresh process; return its outcome and peak memory growth by name."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(max_pixels=MAX_PIXELS), json.dumps(cases)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def bombs():
    return peak_growth(BOMBS)


@pytest.fixture(scope="module")
def largest():
    return peak_growth(LARGEST)


@pytest.mark.parametrize("name", BOMBS)
def test_a_bomb_is_refused_before_it_costs_memory(bombs, name):
    result = bombs[name]
    assert "MAX_IMAGE_PIXELS" in result["outcome"], result
    assert result["growth"] <= BOUND, f"peak memory grew by {result['growth'] / 2**20:.0f} MiB"


@pytest.mark.parametrize("name", LARGEST)
def test_the_largest_allowed_image_stays_within_the_documented_memory(largest, name):
    result = largest[name]
    assert result["outcome"] == "accepted", result
    assert result["growth"] <= BOUND, f"peak memory grew by {result['growth'] / 2**20:.0f} MiB"


def test_every_icon_inside_an_ico_is_held_to_the_limit():
    small = images.ico_with_png(encode(images.digit_image(0)[0], "PNG"))
    assert decode_image(small, "fine.ico", 28 * 28).size == (28, 28)
    with pytest.raises(ImageError, match="icon 1 of the ICO is 28x28.*MAX_IMAGE_PIXELS"):
        decode_image(small, "big.ico", 28 * 28 - 1)
    bmp_icon = images.ico_with_bmp(width=5000, height=5000)
    with pytest.raises(ImageError, match="5000x5000"):
        decode_image(bmp_icon, "bmp.ico", MAX_PIXELS)


def test_formats_whose_sizes_are_not_checked_are_refused():
    for fmt in ("PPM", "TGA", "PCX", "JPEG2000"):
        data = encode(images.digit_image(0)[0].convert("RGB"), fmt)
        with pytest.raises(ImageError, match="not a decodable image .not PNG, JPEG"):
            decode_image(data, f"digit.{fmt.lower()}", MAX_PIXELS)


def test_large_uploads_are_reduced_to_what_the_model_needs_and_still_classified_alike():
    """A 2048x2048 photo of a digit is reduced on decoding; the tensor matches a plain resize."""
    digit = images.digit_image(0)[0]
    big = encode(digit.resize((2048, 2048), resample=0).convert("RGB"), "JPEG", quality=95)
    reduced = decode_image(big, "big.jpg", 2048 * 2048, keep=InputSpec().decode_size())
    assert max(reduced.size) <= 4 * 28 * 2, "neither decoded nor kept at full size"
    plain = preprocess(decode_image(big, "big.jpg", 2048 * 2048), InputSpec())
    assert torch.allclose(preprocess(reduced, InputSpec()), plain, atol=0.05)


# -- the request's budget --------------------------------------------------------------------


def flat_pngs(count, side):
    return {"image_file": [(io.BytesIO(images.flat_png("RGBA", side)), f"{n}.png") for n in range(count)]}


def test_a_request_decodes_at_most_its_pixel_budget(make_app):
    side = 64
    client = make_app(MAX_IMAGE_PIXELS=side * side).test_client()
    assert client.post(PREDICT, data=flat_pngs(REQUEST_PIXELS_FACTOR, side)).status_code == 200
    response = client.post(PREDICT, data=flat_pngs(REQUEST_PIXELS_FACTOR + 1, side))
    assert response.status_code == 422, response.get_data(as_text=True)
    message = response.json["message"]
    assert f"'{REQUEST_PIXELS_FACTOR}.png'" in message, "the first image over the budget is named"
    assert f"{REQUEST_PIXELS_FACTOR} x MAX_IMAGE_PIXELS" in message


def test_the_budget_counts_what_is_decoded():
    budget = PixelBudget(1000, factor=2)
    budget.spend("a", 1500)
    with pytest.raises(ImageError, match="together are over 2000 pixels"):
        budget.spend("b", 501)
    budget.spend("c", 500)


# -- finite numbers only -----------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_are_422(client, value):
    response = client.post(PREDICT, data={"image_file": [(io.BytesIO(images.float_tiff(value)), "f.tiff")]})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert "f.tiff" in response.json["message"] and "not finite" in response.json["message"]


def _strict_json(text):
    def refuse(constant):
        raise AssertionError(f"{constant} in a response: not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_model_answering_nan_never_puts_nan_in_a_response(tmp_path, make_app, tiny_checkpoint):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    for name, tensor in checkpoint["model_state_dict"].items():
        if name.endswith("bias"):
            tensor.fill_(float("nan"))
    broken = tmp_path / "models" / "0123456789abcdef0123456789abcdef" / "model" / "model.pt"
    broken.parent.mkdir(parents=True)
    torch.save(checkpoint, broken)
    # As deployed: an error in a view is answered, not raised into the test.
    client = make_app(PRED_MODEL_PATH=str(broken), PROPAGATE_EXCEPTIONS=False).test_client()
    response = client.post(PREDICT, data={"image_file": [(io.BytesIO(images.png()), "d.png")]})
    body = _strict_json(response.get_data(as_text=True))
    assert response.status_code >= 500 and body["code"] == response.status_code


def test_the_app_refuses_to_write_nan_as_json(app):
    with app.app_context(), pytest.raises(ValueError):
        app.json.dumps({"confidence": float("nan")})
