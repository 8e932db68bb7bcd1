"""Image -> the tensor the network was trained on: the template's stretch, or torchvision's
resize + center crop + normalise (no web framework and no network here).

Two ways, chosen by the model's metadata (see :func:`service.formats.input_spec`):

- *stretch* (the template's, and the default): the image is scaled to the input size as it is,
  to float pixels in [0, 1]; grayscale models also get their strokes' polarity normalised.
- *resize and crop* (``resize`` set), exactly as torchvision's ``ImageClassification`` preset
  does it on a PIL image: the shorter side scaled to ``resize`` on the 8-bit image with the
  given filter (antialiased), a center crop of the input size, pixels to [0, 1], then
  ``(x - mean) / std``. Answers then equal those of ``weights.transforms()`` in training.
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Input polarities: light strokes on a dark background (the template's digits, MNIST), dark
# strokes on a light one, or "none" for pictures that have no strokes (left as they are).
LIGHT_ON_DARK = "light-on-dark"
DARK_ON_LIGHT = "dark-on-light"
NO_POLARITY = "none"
POLARITIES = (LIGHT_ON_DARK, DARK_ON_LIGHT, NO_POLARITY)

# The filters a resize may use, by torchvision's InterpolationMode names.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

# A stretched image is decoded (or reduced) down to no less than this many times the input
# size: the template's margin, which its digits' answers depend on.
_STRETCH_MARGIN = 4
# An image to be resized is decoded (or reduced) down to no less than this many times the resize
# on its shorter side. Measured on 2, 12 and 48 MP photos (BENCHMARKS.md, "Photos: the decode
# margin"): at 2 the crop the network sees differs from the full decode's by 0.12-0.16 % of the
# pixel range on average (at most 5/255); at 1 by three to four times that, for 0-30 % less CPU;
# at 3 by rounding only, for 1.4-1.7 times margin 2's decode of a 12 MP photo.
RESIZE_MARGIN = 2


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: channels, size, how to get there, normalisation, and polarity.

    ``height`` x ``width`` is the tensor's size: the stretch's target, or the center crop after
    the shorter side is resized to ``resize``.
    """

    channels: int = 1
    height: int = 28
    width: int = 28
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # How the network saw its strokes; uploads of the other polarity are inverted first. Unset:
    # light-on-dark for stretched grayscale (the template's kind), none otherwise.
    polarity: str | None = None
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.polarity is None:
            template_kind = self.channels == 1 and self.resize is None
            object.__setattr__(self, "polarity", LIGHT_ON_DARK if template_kind else NO_POLARITY)
        if self.polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {', '.join(POLARITIES)}, got {self.polarity!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize is not None and (self.resize < min(self.height, self.width)):
            raise ValueError(f"the crop {self.height}x{self.width} is larger than the resize {self.resize}")

    @property
    def shape(self):
        return (self.channels, self.height, self.width)

    def decode_size(self):
        """The smallest (width, height) an upload may be decoded or reduced to before preprocessing."""
        if self.resize is None:
            side = _STRETCH_MARGIN * max(self.height, self.width)
        else:
            side = RESIZE_MARGIN * self.resize
        return side, side

    def describe(self):
        """The preprocessing in words and numbers, as ``flask model inspect`` and the API show it."""
        steps = {"input_shape": list(self.shape), "polarity": self.polarity}
        if self.resize is None:
            steps["resize"] = f"stretch to {self.width}x{self.height}"
        else:
            steps.update(resize=self.resize, crop=[self.height, self.width], interpolation=self.interpolation)
        steps["normalize"] = {"mean": list(self.mean), "std": list(self.std)} if self.mean else None
        return steps


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
    array = np.asarray(image if image.mode == target else image.convert(target), dtype=np.float32) / 255.0
    return array.reshape(*array.shape[:2], -1)


def _eight_bit(image, channels):
    """``image`` in Pillow's 8-bit ``L`` or ``RGB``, as a training script's ``.convert()`` makes it;
    16- and 32-bit grayscale are scaled into 8 bits (Pillow's own conversion would clip them)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        scale = 65535.0 if image.mode != "F" else 255.0
        gray = np.clip(np.asarray(image, dtype=np.float32) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L")
    return image.convert("L" if channels == 1 else "RGB")


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


def median(values):
    """``float(np.median(values))`` of a 1-D float array of finite numbers, the same value, in a
    fifth of the time on the small frames polarity looks at (np.median's checks and dispatch cost
    more than partitioning a few hundred pixels)."""
    middle = len(values) // 2
    if len(values) % 2:
        return float(np.partition(values, middle)[middle])
    low, high = np.partition(values, (middle - 1, middle))[middle - 1 : middle + 1]
    return float((low + high) / 2)  # as np.median: the mean of the two, in the array's own precision


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
    gray = pixels[..., 0] if pixels.shape[2] == 1 else pixels.mean(axis=2)  # one channel: its own mean
    height, width = gray.shape
    edge = max(1, round(min(height, width) / 14))
    frame = np.concatenate(
        [gray[:edge].ravel(), gray[-edge:].ravel(), gray[edge:-edge, :edge].ravel(), gray[edge:-edge, -edge:].ravel()]
    )
    background = median(frame)
    if gray.mean() < background:
        pixels, gray, background = 1.0 - pixels, 1.0 - gray, 1.0 - background
    ink = float(gray.max())
    if background > 0.5 / 255 and ink - background > 0.05:  # not on black already, and not blank
        pixels = np.clip((pixels - background) / (ink - background), 0.0, 1.0)
    return 1.0 - pixels if polarity == DARK_ON_LIGHT else pixels


def resized_size(width, height, shorter):
    """The size torchvision's ``Resize(shorter)`` gives a ``width`` x ``height`` image."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _resize_and_crop(image, spec):
    """torchvision's ``Resize(spec.resize)`` then ``CenterCrop``, on the 8-bit PIL image."""
    image = _eight_bit(image, spec.channels)
    size = resized_size(image.width, image.height, spec.resize)
    if size != image.size:
        image = image.resize(size, INTERPOLATIONS[spec.interpolation])
    top = int(round((image.height - spec.height) / 2.0))
    left = int(round((image.width - spec.width) / 2.0))
    return image.crop((left, top, left + spec.width, top + spec.height))


def preprocess(image, spec):
    """Turn a decoded image into the CxHxW float tensor the network was trained on.

    Unless the model's polarity is "none", transparent areas become background and the image is
    brought to the model's polarity, background and stroke levels (:func:`_normalise_polarity`).
    """
    if spec.resize is not None:
        cropped = np.array(_resize_and_crop(image, spec))  # a writable copy of the small crop, for torch
        tensor = torch.from_numpy(cropped.reshape(spec.height, spec.width, -1)).permute(2, 0, 1).float().div_(255)
        if spec.polarity != NO_POLARITY:
            pixels = _normalise_polarity(tensor.permute(1, 2, 0).numpy(), spec.polarity)
            tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32))
        return _normalised(tensor.contiguous(), spec)
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
    return _normalised(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), spec)


def _normalised(tensor, spec):
    if spec.mean is None or spec.std is None:
        return tensor
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (tensor - mean) / std
