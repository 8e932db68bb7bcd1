"""Decoding and preprocessing: every image kind a client may send becomes the tensor the model expects."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.images import ImageError, decode_image
from service.preprocess import InputSpec, preprocess
from tests import images
from tests.support import digit_image, encode

DIGIT_SPEC = InputSpec()  # the template's 1x28x28 grayscale in [0, 1]
NO_LIMIT = 10**9


def digit_pixels(index=0):
    """The reference digit as a 28x28 float array in [0, 1], straight from its 8-bit pixels."""
    return np.asarray(digit_image(index)[0], dtype=np.float32) / 255.0


def tensor_of(data, spec=DIGIT_SPEC, filename="upload"):
    return preprocess(decode_image(data, filename, NO_LIMIT), spec)


@pytest.mark.parametrize("kind", sorted(images.VALID_KINDS))
def test_each_image_kind_becomes_the_digit_the_model_expects(kind):
    data, _ = images.VALID_KINDS[kind]()
    tensor = tensor_of(data, filename=f"digit.{kind}")

    assert tensor.shape == (1, 28, 28)
    assert tensor.dtype == torch.float32
    assert 0.0 <= tensor.min().item() and tensor.max().item() <= 1.0
    expected = digit_pixels()
    if kind == "rgba_png":
        # The strokes' alpha equals their brightness: composited over black, each pixel is a * a.
        expected = expected * expected
    difference = np.abs(tensor[0].numpy() - expected)
    # Lossless kinds match exactly; JPEG and a 16-colour palette are a few grey levels off.
    assert difference.mean() < 0.02, kind
    assert difference.max() < 0.07, kind


def test_the_first_frame_of_an_animated_gif_is_used():
    tensor = tensor_of(images.animated_gif(0))
    blank_second_frame = torch.zeros_like(tensor)
    assert not torch.equal(tensor, blank_second_frame)
    assert np.abs(tensor[0].numpy() - digit_pixels()).max() < 1e-6


def test_sixteen_bit_images_are_scaled_not_clipped():
    # 16-bit grey 0x8080 is mid-grey; clipping to 8 bits would make it white.
    image = Image.fromarray(np.full((28, 28), 0x8080, dtype=np.uint16))
    tensor = tensor_of(encode(image, "PNG"))
    assert tensor.min().item() == pytest.approx(0x8080 / 65535, abs=1e-4)
    assert tensor.max().item() == pytest.approx(0x8080 / 65535, abs=1e-4)


def _marked_image(size=(40, 20)):
    """A black image with a white block in its top-left corner only: its orientation is obvious."""
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 8))
    return image


@pytest.mark.parametrize(
    ("orientation", "stored_as"),
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_90),  # viewers turn it 90 degrees clockwise
        (8, Image.Transpose.ROTATE_270),  # viewers turn it 90 degrees anticlockwise
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
def test_exif_orientation_is_applied(orientation, stored_as):
    upright = _marked_image()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(upright.transpose(stored_as), "JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255
    assert stored[:4, :4].mean() < 0.5, "the stored pixels must not already be upright"

    decoded = decode_image(data, "photo.jpg", NO_LIMIT)

    assert decoded.size == upright.size
    pixels = np.asarray(decoded.convert("L"), dtype=np.float32) / 255
    assert pixels[:4, :4].mean() > 0.9  # the block is back in the top-left corner
    assert pixels[-4:, -4:].mean() < 0.1
    assert pixels[-4:, :4].mean() < 0.1 and pixels[:4, -4:].mean() < 0.1


def test_images_are_resized_to_the_models_input_size():
    # Left half white, right half black, and not the model's size or aspect ratio.
    image = Image.new("L", (100, 60), 0)
    image.paste(255, (0, 0, 50, 60))
    tensor = tensor_of(encode(image, "PNG"))
    assert tensor.shape == (1, 28, 28)
    assert tensor[0, :, :12].mean().item() > 0.95
    assert tensor[0, :, -12:].mean().item() < 0.05

    other = InputSpec(1, 16, 20)
    assert tensor_of(encode(image, "PNG"), other).shape == (1, 16, 20)


@pytest.mark.parametrize(
    ("colour", "channels"),
    [((255, 0, 0), (1.0, 0.0, 0.0)), ((0, 255, 0), (0.0, 1.0, 0.0)), ((0, 0, 255), (0.0, 0.0, 1.0))],
)
def test_three_channel_models_get_the_colours(colour, channels):
    tensor = tensor_of(encode(Image.new("RGB", (50, 40), colour), "PNG"), InputSpec(3, 32, 32))
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    for channel, value in enumerate(channels):
        assert torch.allclose(tensor[channel], torch.full((32, 32), value))


@pytest.mark.parametrize("kind", ["png", "png_16bit", "cmyk_jpeg", "palette_png_transparency", "rgba_png"])
def test_three_channel_models_get_grey_images_on_every_channel(kind):
    data, _ = images.VALID_KINDS[kind]()
    tensor = tensor_of(data, InputSpec(3, 28, 28))
    assert tensor.shape == (3, 28, 28)
    assert tensor.max().item() > 0.5
    assert torch.allclose(tensor[0], tensor[1], atol=0.02) and torch.allclose(tensor[1], tensor[2], atol=0.02)


def test_transparent_areas_become_black_for_colour_models():
    image = Image.new("RGBA", (20, 20), (255, 255, 255, 0))
    image.paste((255, 0, 0, 255), (0, 0, 10, 20))
    tensor = tensor_of(encode(image, "PNG"), InputSpec(3, 20, 20))
    assert torch.allclose(tensor[:, :, 10:], torch.zeros(3, 20, 10))
    assert torch.allclose(tensor[0, :, :10], torch.ones(20, 10))


def test_normalisation_is_applied_per_channel():
    data = images.png(0)
    plain = tensor_of(data)
    normalised = tensor_of(data, InputSpec(1, 28, 28, mean=(0.1307,), std=(0.3081,)))
    assert torch.allclose(normalised, (plain - 0.1307) / 0.3081)
    assert normalised.min().item() < 0  # no longer clamped to [0, 1]

    red = encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")
    colour = tensor_of(red, InputSpec(3, 8, 8, mean=(0.5, 0.5, 0.0), std=(0.5, 0.25, 2.0)))
    assert torch.allclose(colour[0], torch.full((8, 8), 1.0))
    assert torch.allclose(colour[1], torch.full((8, 8), -2.0))
    assert torch.allclose(colour[2], torch.zeros(8, 8))


def test_an_empty_file_is_refused_by_name():
    with pytest.raises(ImageError, match="empty") as caught:
        decode_image(b"", "nothing.png", NO_LIMIT)
    assert caught.value.filename == "nothing.png"
    assert "nothing.png" in str(caught.value)


def test_text_is_not_an_image():
    with pytest.raises(ImageError, match="not a decodable image") as caught:
        decode_image(images.text_as_png(), "notes.png", NO_LIMIT)
    assert "notes.png" in str(caught.value)


@pytest.mark.parametrize("kind", ["png", "jpeg", "gif", "webp", "tiff"])
def test_truncated_images_are_refused(kind):
    data, _ = images.VALID_KINDS[kind]()
    with pytest.raises(ImageError) as caught:
        decode_image(images.truncated(data, 0.6), f"cut.{kind}", NO_LIMIT)
    assert f"cut.{kind}" in str(caught.value)


def test_a_decompression_bomb_is_refused_by_its_header():
    bomb = images.bomb_png()
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS") as caught:
        decode_image(bomb, "bomb.png", 4096 * 4096)
    assert "20000x20000" in str(caught.value)


def test_the_pixel_limit_is_checked_before_any_pixel_is_decoded():
    # Only the PNG signature, the header and the start of the first data chunk survive: decoding
    # would fail as truncated, so the pixel-limit error proves the size was judged from the header.
    header_only = images.bomb_png()[:60]
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        decode_image(header_only, "bomb.png", 4096 * 4096)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(header_only, "bomb.png", NO_LIMIT)


def test_the_pixel_limit_is_inclusive():
    data = images.png(0)
    assert decode_image(data, "digit.png", 28 * 28).size == (28, 28)
    with pytest.raises(ImageError, match="784 pixels, over the limit of 783"):
        decode_image(data, "digit.png", 28 * 28 - 1)


def test_long_filenames_are_shortened_in_messages():
    name = "x" * 500 + ".png"
    with pytest.raises(ImageError) as caught:
        decode_image(b"", name, NO_LIMIT)
    assert len(str(caught.value)) < 200
    assert caught.value.filename == name
