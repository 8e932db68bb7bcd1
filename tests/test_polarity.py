"""Input polarity: digits written dark on light, photographed on grey paper or drawn on a
transparent canvas reach the network as the light-on-dark digits it was trained on."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.formats import ModelFileError, input_spec, read_model
from service.images import decode_image
from service.preprocess import InputSpec, preprocess
from service.training import split_digits
from tests.support import encode, write_template_checkpoint

SPEC = InputSpec()  # the template's: 1x28x28, light-on-dark


def ink(pixels, size):
    """An 8x8 scikit-learn digit (values 0..16) as stroke strength in [0, 1] at ``size`` pixels."""
    image = Image.fromarray((np.asarray(pixels, dtype=np.float32) / 16.0), mode="F")
    return np.clip(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)), 0.0, 1.0)


def gray_png(levels):
    return encode(Image.fromarray(np.round(np.clip(levels, 0, 1) * 255).astype(np.uint8)), "PNG")


def light_on_dark(pixels, rng, size=28):
    """White strokes on black: the training images' own kind."""
    return gray_png(ink(pixels, size))


def dark_on_light(pixels, rng, size=28):
    """Black strokes on white: how people write, scan or draw on a canvas."""
    return gray_png(1.0 - ink(pixels, size))


def photographed_paper(pixels, rng, size=96):
    """A photo of a digit on paper: grey, unevenly lit, slightly tinted paper, dark ink, sensor noise."""
    strokes = ink(pixels, size)
    y, x = np.mgrid[0:size, 0:size] / size
    paper = 0.72 + 0.08 * (x - 0.5) - 0.06 * (y - 0.5)
    value = paper * (1 - strokes) + 0.18 * strokes + rng.normal(0.0, 0.05, strokes.shape)
    rgb = np.stack([value, value * 0.97, value * 0.9], axis=-1)
    return encode(Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB"), "JPEG", quality=90)


def on_transparency(colour):
    """Strokes of one colour on a fully transparent canvas, their coverage in the alpha channel."""

    def draw(pixels, rng, size=28):
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = np.round(ink(pixels, size) * 255).astype(np.uint8)
        return encode(Image.fromarray(rgba, "RGBA"), "PNG")

    return draw


KINDS = {
    "light-on-dark": light_on_dark,
    "dark-on-light": dark_on_light,
    "photographed paper": photographed_paper,
    "black on transparent": on_transparency((0, 0, 0)),
    "white on transparent": on_transparency((255, 255, 255)),
}


def tensor(data, spec=SPEC):
    return preprocess(decode_image(data, "upload", 10**8), spec)


@pytest.fixture(scope="module")
def digits():
    return split_digits().images[:40]


@pytest.mark.parametrize("kind", ["dark-on-light", "black on transparent", "white on transparent"])
def test_every_clean_polarity_becomes_the_training_image(kind, digits):
    rng = np.random.default_rng(0)
    for pixels in digits:
        expected = tensor(light_on_dark(pixels, rng))
        # PNG keeps 8 bits: an inverted or alpha-composited level may round one step away.
        assert torch.allclose(tensor(KINDS[kind](pixels, rng)), expected, atol=1.01 / 255), kind


def test_light_on_black_is_left_exactly_as_the_template_served_it(digits):
    for pixels in digits[:10]:
        data = light_on_dark(pixels, None)
        raw = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0
        assert torch.equal(tensor(data)[0], torch.from_numpy(raw))


def test_photographed_paper_is_levelled_to_a_black_background_and_full_strokes(digits):
    rng = np.random.default_rng(1)
    for pixels in digits:
        clean = tensor(light_on_dark(pixels, rng))[0].numpy()
        photo = tensor(photographed_paper(pixels, rng))[0].numpy()
        assert np.median(photo[clean == 0]) == 0.0, "the paper becomes the black background"
        assert photo.max() == pytest.approx(1.0) and np.percentile(photo, 99) > 0.8, "the ink becomes strokes"
        assert np.corrcoef(photo.ravel(), clean.ravel())[0, 1] > 0.9


def test_a_light_digit_on_a_grey_background_is_levelled_too(digits):
    strokes = ink(digits[0], 28)
    levelled = tensor(gray_png(0.3 + 0.6 * strokes))[0].numpy()
    clean = tensor(gray_png(strokes))[0].numpy()
    # The background goes to 0 and the strongest stroke to 1.
    assert np.abs(levelled - clean / clean.max()).max() < 3 / 255


def test_blank_images_stay_blank():
    for level in (0.0, 0.5, 1.0):
        got = tensor(gray_png(np.full((28, 28), level)))
        assert torch.allclose(got, torch.full_like(got, level), atol=1 / 255), level


def test_a_dark_on_light_model_gets_its_polarity_whatever_the_upload(digits, tmp_path):
    path = write_template_checkpoint(tmp_path / "model.pt", metadata={"polarity": "dark-on-light"})
    classifier, _ = read_model(path.read_bytes())
    assert classifier.input_spec.polarity == "dark-on-light"
    rng = np.random.default_rng(2)
    expected = 1.0 - tensor(light_on_dark(digits[0], rng))
    for kind in ("light-on-dark", "dark-on-light", "black on transparent"):
        got = preprocess(decode_image(KINDS[kind](digits[0], rng), "upload", 10**8), classifier.input_spec)
        assert torch.allclose(got, expected, atol=1.01 / 255), kind


def test_polarity_comes_from_the_model_metadata():
    assert input_spec({}).polarity == "light-on-dark", "the template's models: light strokes on dark"
    assert input_spec({"input_shape": [3, 32, 32]}).polarity == "none", "colour pictures are not inverted"
    assert input_spec({"polarity": "dark-on-light"}).polarity == "dark-on-light"
    assert input_spec({"input_shape": [3, 32, 32], "polarity": "light-on-dark"}).polarity == "light-on-dark"
    with pytest.raises(ModelFileError, match="polarity must be one of light-on-dark, dark-on-light, none, got 'inverted'"):
        input_spec({"polarity": "inverted"})


def test_a_colour_model_sees_pictures_unchanged():
    picture = np.zeros((16, 16, 3), np.uint8)
    picture[..., 0] = 230  # a light frame around a dark centre: it would pass for dark-on-light
    picture[4:12, 4:12] = (10, 40, 90)
    got = tensor(encode(Image.fromarray(picture, "RGB"), "PNG"), InputSpec(3, 16, 16))
    assert torch.allclose(got, torch.from_numpy(picture.transpose(2, 0, 1) / 255.0).float())


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_trained_model_reads_held_out_digits_of_every_kind(kind, trained_checkpoint):
    """Held-out accuracy for each kind of upload; the logged accuracy is for light-on-dark PNGs."""
    classifier, _ = read_model(trained_checkpoint.read_bytes())
    logged = torch.load(trained_checkpoint, weights_only=True)["test_accuracy"]
    split = split_digits()
    rng = np.random.default_rng(3)
    uploads = [KINDS[kind](split.images[i], rng) for i in split.test]
    predictions = classifier.classify([classifier.prepare(data, "upload", 10**8) for data in uploads])
    labels = [str(split.targets[i]) for i in split.test]
    accuracy = np.mean([p.label == label for p, label in zip(predictions, labels)])
    assert accuracy >= logged - (0.02 if kind == "photographed paper" else 1 / len(labels)), (kind, accuracy)


@pytest.mark.parametrize("size", [1, 2, 3, 208, 209, 1000])
def test_the_frame_median_is_numpys(size):
    from service.preprocess import median

    rng = np.random.default_rng(size)
    for values in (rng.random(size, dtype=np.float32), rng.integers(0, 256, size).astype(np.float32) / 255,
                   np.full(size, 0.25, dtype=np.float32), np.float32(1e-38) * rng.random(size, dtype=np.float32),
                   rng.random(size) / 3):  # float64 too
        assert median(values) == float(np.median(values))
