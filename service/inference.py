"""Image decoding, preprocessing and batched classification (no web framework here)."""

import io
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, TiffImagePlugin

# The service checks the size of every image, frame, tile and embedded image itself, before any
# of it is decoded (decode_image), against its own MAX_IMAGE_PIXELS. Pillow's process-wide guard
# would otherwise answer first, and vaguely, or only warn and decode: it stays off.
Image.MAX_IMAGE_PIXELS = None

# The formats the service reads, by Pillow's names (JPEG includes MPO, a camera's multi-picture
# JPEG). Each one's sizes are checked below before decoding; any other format is refused, so no
# decoder whose sizes go unchecked (JPEG 2000 tiles, PSD layers, ICNS, EPS) ever runs.
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "ICO")
_ACCEPTED_NAMES = "PNG, JPEG, GIF, BMP, WebP, TIFF or ICO"

# The images of one request may together decode at most this many times MAX_IMAGE_PIXELS: it
# bounds the CPU time one request can take, whatever its number of files.
REQUEST_PIXELS_FACTOR = 4

# Images are reduced by a whole factor right after decoding, as long as they stay at least this
# many times the model's input size: preprocessing then works on a small bitmap.
_REDUCE_MARGIN = 4

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An upload is not an image we can classify; the message names the file."""

    def __init__(self, filename, problem):
        shown = filename if filename is None or len(filename) <= 120 else f"{filename[:117]}..."
        super().__init__(f"{shown!r}: {problem}")
        self.filename = filename
        self.problem = problem


# Input polarities: light strokes on a dark background (the template's digits, MNIST), dark
# strokes on a light one, or "none" for pictures that have no strokes (left as they are).
LIGHT_ON_DARK = "light-on-dark"
DARK_ON_LIGHT = "dark-on-light"
NO_POLARITY = "none"
POLARITIES = (LIGHT_ON_DARK, DARK_ON_LIGHT, NO_POLARITY)


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: channels, size, optional per-channel normalisation, and polarity."""

    channels: int = 1
    height: int = 28
    width: int = 28
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # How the network saw its strokes; uploads of the other polarity are inverted first. Unset:
    # light-on-dark for grayscale (the template's kind), none for colour (pictures, not strokes).
    polarity: str | None = None

    def __post_init__(self):
        if self.polarity is None:
            object.__setattr__(self, "polarity", LIGHT_ON_DARK if self.channels == 1 else NO_POLARITY)
        if self.polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {', '.join(POLARITIES)}, got {self.polarity!r}")

    @property
    def shape(self):
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class Prediction:
    """One image's result: the top label, its probability and optionally the k best."""

    label: str
    confidence: float
    top_k: list[tuple[str, float]] | None = None


class PixelBudget:
    """The pixels the images of one request may still decode: MAX_IMAGE_PIXELS each, and
    REQUEST_PIXELS_FACTOR times that for all of them together."""

    def __init__(self, max_pixels, factor=REQUEST_PIXELS_FACTOR):
        self.max_pixels = max_pixels
        self.total = max_pixels * factor
        self.left = self.total

    def check(self, filename, width, height, what="the image"):
        """Raise ImageError when one image (or a frame, tile or embedded image of it) is over the limit."""
        if width * height > self.max_pixels:
            raise ImageError(
                filename,
                f"{what} is {width}x{height}, {width * height} pixels, over the limit of {self.max_pixels} "
                "(MAX_IMAGE_PIXELS)",
            )

    def spend(self, filename, pixels):
        """Count ``pixels`` about to be decoded; raise ImageError when the request has none left."""
        if pixels > self.left:
            raise ImageError(
                filename,
                f"the request's images together are over {self.total} pixels ({REQUEST_PIXELS_FACTOR} x "
                "MAX_IMAGE_PIXELS): send fewer or smaller images",
            )
        self.left -= pixels


def decode_image(data, filename, max_pixels, *, budget=None, size=None):
    """Decode ``data`` (bytes) into an upright PIL image, first frame only.

    Raises ImageError for empty, unknown, truncated or oversized images and for pixels that are
    not finite numbers. Sizes are checked before anything is decoded: the image, and the tiles
    of a TIFF and the images inside an ICO, each against ``max_pixels``; ``budget`` (a
    PixelBudget) also counts them against the request's total. With ``size`` (width, height), a
    JPEG is decoded at a reduced scale and any image reduced by a whole factor, staying at least
    ``_REDUCE_MARGIN`` times ``size``: large uploads then cost little memory and time.
    """
    if not data:
        raise ImageError(filename, "the file is empty")
    if budget is None:
        budget = PixelBudget(max_pixels)
    if data[:4] == b"\0\0\1\0":
        _check_ico_directory(data, filename, budget)  # Pillow decodes an ICO inside open()
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageError(filename, f"not a decodable image (not {_ACCEPTED_NAMES})") from None
    except Exception as exc:  # Pillow raises many types for bytes it cannot identify.
        raise ImageError(filename, f"not a decodable image ({exc.__class__.__name__})") from None
    budget.check(filename, *image.size)
    decoded = image.width * image.height
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        decoded = max(decoded, _tiff_tile_pixels(image, filename, budget))
    if size and image.format in ("JPEG", "MPO"):
        reduced_to = _at_least(size)
        image.draft(None, reduced_to)  # libjpeg scales by 1/2, 1/4 or 1/8 while decoding
        decoded = image.width * image.height
    budget.spend(filename, decoded)
    try:
        image.seek(0)
        image.load()
    except Exception as exc:  # truncated or corrupt data: each decoder has its own error types
        raise ImageError(filename, f"the image data is corrupt or truncated ({exc})") from None
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise ImageError(filename, "some pixels are not finite numbers (NaN or infinity)")
    if size:
        image = _reduce(image, _at_least(size))
    return ImageOps.exif_transpose(image)


def _at_least(size):
    """The smallest size a reduced image keeps: a margin over the model's input, either way up."""
    side = _REDUCE_MARGIN * max(size)
    return side, side


def _reduce(image, keep):
    """``image`` reduced by the largest whole factor that keeps it at least ``keep`` (box filter)."""
    factor = min(image.width // keep[0], image.height // keep[1])
    if factor < 2:
        return image
    # Modes Pillow cannot reduce become the mode preprocessing would make of them anyway.
    if image.mode == "PA" or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    elif image.mode == "P":
        image = image.convert("RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.reduce(factor)


def _tiff_tile_pixels(image, filename, budget):
    """Check each tile of a tiled TIFF against the limit; return the pixels all tiles decode.

    A TIFF's tiles are decoded whole, padding included, and may declare any size whatever the
    image's: a 16x16 image in one 46336x46336 tile would cost gigabytes.
    """
    tags = image.tag_v2
    width, height = tags.get(TiffImagePlugin.TILEWIDTH), tags.get(TiffImagePlugin.TILELENGTH)
    if width is None and height is None:
        return 0  # strips: never wider than the image, and libtiff cuts them at its height
    if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
        raise ImageError(filename, "not a decodable image (invalid TIFF tile size)")
    budget.check(filename, width, height, what="a TIFF tile")
    columns, rows = math.ceil(image.width / width), math.ceil(image.height / height)
    return columns * rows * width * height


def _check_ico_directory(data, filename, budget):
    """Check the size of every image inside an ICO from its bytes, before Pillow decodes any.

    The directory's own sizes (at most 256x256) are not what is decoded: each entry points at an
    embedded PNG or BMP whose header says the real size.
    """
    try:
        (count,) = struct.unpack_from("<H", data, 4)
        for index in range(count):
            _, _, _, _, _, _, _, offset = struct.unpack_from("<BBBBHHII", data, 6 + 16 * index)
            if data[offset : offset + 8] == _PNG_MAGIC:
                width, height = struct.unpack_from(">II", data, offset + 16)  # IHDR, the first chunk
            else:
                # A BMP header, OS/2's short one or BITMAPINFOHEADER; its height counts the
                # image and its transparency mask, one above the other.
                header_size = struct.unpack_from("<I", data, offset)[0]
                layout = "<HH" if header_size == 12 else "<ii"
                width, height = (abs(v) for v in struct.unpack_from(layout, data, offset + 4))
                height //= 2
            budget.check(filename, width, height, what=f"icon {index + 1} of the ICO")
    except struct.error:
        raise ImageError(filename, "the image data is corrupt or truncated (an ICO entry is cut short)") from None


def _pixels(image, channels):
    """Return ``image`` as float32 HxWxC in [0, 1]; transparent areas become black background."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16-bit and 32-bit grayscale: Pillow's convert("L") would clip rather than scale.
        scale = 65535.0 if image.mode != "F" else 255.0
        gray = np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0)[..., None]
        return np.repeat(gray, channels, axis=2)
    target = "L" if channels == 1 else "RGB"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32)[..., None] / 255.0
        color = np.asarray(rgba.convert(target), dtype=np.float32).reshape(*alpha.shape[:2], -1) / 255.0
        return color * alpha
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1-bit...
    array = np.asarray(image.convert(target), dtype=np.float32) / 255.0
    return array.reshape(*array.shape[:2], -1)


def _flatten_on_contrast(image):
    """Composite an image with transparent areas onto the background its strokes stand out from.

    Transparent areas are background. When what is opaque is all of one tone, it is the strokes:
    black goes behind light strokes, white behind dark ones, so a black drawing on a transparent
    canvas does not vanish into black. When it has both tones, it has a background of its own,
    its majority tone, which the transparent areas then extend.
    """
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    if alpha.min() == 255:
        return rgba.convert("RGB")
    opaque = np.asarray(rgba.convert("L"))[alpha >= 128]
    light = float((opaque >= 128).mean()) if opaque.size else 1.0
    dark_background = light >= 0.9 or 0.1 < light < 0.5
    colour = (0, 0, 0, 255) if dark_background else (255, 255, 255, 255)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, colour), rgba).convert("RGB")


def _normalise_polarity(pixels, polarity):
    """Make HxWxC pixels in [0, 1] look like the network's training images: strokes in its
    polarity on a clean background.

    The background level is the median of a thin frame around the image (digits seldom reach the
    edge; a grey, noisy paper still is background there); strokes darker than it on average make
    a dark-on-light image, which is inverted. A background that is not then black (grey paper) is
    levelled: the frame's level goes to 0 and the strongest stroke to 1. (Cutting off the
    paper's noise as well costs more stroke edges than it saves: measured, it loses accuracy.)
    An image already light on pure black is left exactly as it is, as the template served it.
    """
    gray = pixels.mean(axis=2)
    height, width = gray.shape
    edge = max(1, round(min(height, width) / 14))
    frame = np.concatenate(
        [gray[:edge].ravel(), gray[-edge:].ravel(), gray[edge:-edge, :edge].ravel(), gray[edge:-edge, -edge:].ravel()]
    )
    background = float(np.median(frame))
    if gray.mean() < background:
        pixels, gray, background = 1.0 - pixels, 1.0 - gray, 1.0 - background
    ink = float(gray.max())
    if background > 0.5 / 255 and ink - background > 0.05:  # not on black already, and not blank
        pixels = np.clip((pixels - background) / (ink - background), 0.0, 1.0)
    return 1.0 - pixels if polarity == DARK_ON_LIGHT else pixels


def preprocess(image, spec):
    """Turn a decoded image into the CxHxW float tensor the network was trained on.

    Unless the model's polarity is "none", transparent areas become background and the image is
    brought to the model's polarity, background and stroke levels (:func:`_normalise_polarity`).
    """
    if spec.polarity != NO_POLARITY:
        image = _flatten_on_contrast(image)
    pixels = _pixels(image, spec.channels)
    if pixels.shape[:2] != (spec.height, spec.width):
        resized = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode="F").resize(
                    (spec.width, spec.height), Image.Resampling.BILINEAR
                )
            )
            for c in range(spec.channels)
        ]
        pixels = np.stack(resized, axis=-1)
    if spec.polarity != NO_POLARITY:
        pixels = _normalise_polarity(pixels, spec.polarity).astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    if spec.mean is not None and spec.std is not None:
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        tensor = (tensor - mean) / std
    return tensor


@dataclass
class Classifier:
    """A network in eval mode with the labels and input spec it was trained with."""

    module: torch.nn.Module
    labels: tuple[str, ...]
    input_spec: InputSpec = field(default_factory=InputSpec)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def forward(self, batch):
        """Return class probabilities for a NxCxHxW batch in one forward pass.

        The network may end in logits or log-probabilities: softmax maps both to probabilities.
        """
        with torch.inference_mode():
            output = self.module(batch.to(self.device, non_blocking=True))
            return torch.softmax(output.float(), dim=1).cpu()

    def classify(self, tensors, top_k=None):
        """Classify preprocessed CxHxW tensors in one batched forward pass, in the order given."""
        probabilities = self.forward(torch.stack(tensors))
        if probabilities.shape[1] != len(self.labels):
            raise RuntimeError(
                f"the network returned {probabilities.shape[1]} classes but the model has {len(self.labels)} labels"
            )
        k = top_k or 1
        values, indices = probabilities.topk(k, dim=1)
        results = []
        for row_values, row_indices in zip(values.tolist(), indices.tolist()):
            ranked = [(self.labels[i], p) for i, p in zip(row_indices, row_values)]
            results.append(Prediction(ranked[0][0], ranked[0][1], ranked if top_k else None))
        return results

    def prepare(self, data, filename, max_pixels, budget=None):
        """Decode one upload and preprocess it at once: only its small tensor outlives the call,
        so a request of many large images never holds all their bitmaps together. ``budget`` (a
        PixelBudget) bounds the pixels all uploads of a request decode together."""
        size = (self.input_spec.width, self.input_spec.height)
        return preprocess(decode_image(data, filename, max_pixels, budget=budget, size=size), self.input_spec)

    def predict(self, images, top_k=None):
        """Classify decoded images in one batched forward pass, in the order given."""
        return self.classify([preprocess(image, self.input_spec) for image in images], top_k)

    def warm_up(self):
        """Run one forward pass on a blank batch, so the first request pays no set-up cost.

        Raises RuntimeError when the network's output does not fit the labels: better at start-up
        than as a 500 on every request.
        """
        probabilities = self.forward(torch.zeros((1, *self.input_spec.shape)))
        if tuple(probabilities.shape) != (1, len(self.labels)):
            raise RuntimeError(
                f"the network returned {list(probabilities.shape)} for one image: {probabilities.shape[-1]} "
                f"classes but the model has {len(self.labels)} labels"
            )
