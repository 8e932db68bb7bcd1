"""Image decoding, preprocessing and batched classification (no web framework here)."""

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

# The service's MAX_IMAGE_PIXELS, checked from the header before any pixel is decoded, replaces
# Pillow's process-wide guard, which would otherwise answer first, and vaguely, for large images.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An upload is not an image we can classify; the message names the file."""

    def __init__(self, filename, problem):
        shown = filename if filename is None or len(filename) <= 120 else f"{filename[:117]}..."
        super().__init__(f"{shown!r}: {problem}")
        self.filename = filename
        self.problem = problem


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: channels, size and optional per-channel normalisation."""

    channels: int = 1
    height: int = 28
    width: int = 28
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def shape(self):
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class Prediction:
    """One image's result: the top label, its probability and optionally the k best."""

    label: str
    confidence: float
    top_k: list[tuple[str, float]] | None = None


def decode_image(data, filename, max_pixels):
    """Decode ``data`` (bytes) into an upright PIL image, first frame only.

    Raises ImageError for empty, unknown, truncated or oversized images. The size check runs on
    the header, before decoding, so a decompression bomb costs nothing.
    """
    if not data:
        raise ImageError(filename, "the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for bytes it cannot identify.
        raise ImageError(filename, f"not a decodable image ({exc.__class__.__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            filename, f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels} (MAX_IMAGE_PIXELS)"
        )
    try:
        image.seek(0)
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # truncated or corrupt data: each decoder has its own error types
        raise ImageError(filename, f"the image data is corrupt or truncated ({exc})") from None


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


def preprocess(image, spec):
    """Turn a decoded image into the CxHxW float tensor the network was trained on."""
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

    def prepare(self, data, filename, max_pixels):
        """Decode one upload and preprocess it at once: only its small tensor outlives the call,
        so a request of many large images never holds all their bitmaps together."""
        return preprocess(decode_image(data, filename, max_pixels), self.input_spec)

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
