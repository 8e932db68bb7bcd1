"""Bytes -> an upright image within the pixel limits, decoded at the smallest scale the model needs.

No web framework and no network here: the predict views and the parity check hand in bytes, and
:mod:`service.preprocess` takes the image from here.

Limits. Every image, TIFF tile and image inside an ICO is checked against ``MAX_IMAGE_PIXELS``
before any of it is decoded, and the images of one request together may decode at most
``REQUEST_PIXELS_FACTOR`` times that. What counts is what is *decoded*: a baseline JPEG is decoded
by libjpeg at 1/2, 1/4 or 1/8 of its size when the model needs no more, so a 48 MP phone photo
that decodes into 0.75 MP is classified, while a 48 MP PNG, which can only be decoded whole, is
refused. A JPEG may declare at most ``JPEG_DECLARED_FACTOR`` times ``MAX_IMAGE_PIXELS`` (its
entropy-coded data is read whole at any scale), and a progressive JPEG no more than
``MAX_IMAGE_PIXELS``, since libjpeg keeps all of its coefficients at full size while decoding.
"""

import io
import math
import struct

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, TiffImagePlugin

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

# A baseline JPEG may declare this many times MAX_IMAGE_PIXELS when it decodes, at reduced scale,
# within MAX_IMAGE_PIXELS: 4 x 16.7 MP takes an 8192x8192 (67 MP) photo, a 48 MP phone camera's
# 8000x6000 among them.
JPEG_DECLARED_FACTOR = 4

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An upload is not an image we can classify; the message names the file."""

    def __init__(self, filename, problem):
        shown = filename if filename is None or len(filename) <= 120 else f"{filename[:117]}..."
        super().__init__(f"{shown!r}: {problem}")
        self.filename = filename
        self.problem = problem


class PixelBudget:
    """The pixels the images of one request may still decode: MAX_IMAGE_PIXELS each, and
    REQUEST_PIXELS_FACTOR times that for all of them together."""

    def __init__(self, max_pixels, factor=REQUEST_PIXELS_FACTOR):
        self.max_pixels = max_pixels
        self.total = max_pixels * factor
        self.left = self.total

    def check(self, filename, width, height, what="the image", limit=None):
        """Raise ImageError when one image (or a frame, tile or embedded image of it) is over the limit."""
        limit = limit or self.max_pixels
        if width * height > limit:
            setting = "MAX_IMAGE_PIXELS" if limit == self.max_pixels else f"{limit // self.max_pixels} x MAX_IMAGE_PIXELS"
            raise ImageError(
                filename,
                f"{what} is {width}x{height}, {width * height} pixels, over the limit of {limit} ({setting})",
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


def decode_image(data, filename, max_pixels, *, budget=None, keep=None):
    """Decode ``data`` (bytes) into an upright PIL image, first frame only.

    Raises ImageError for empty, unknown, truncated or oversized images and for pixels that are
    not finite numbers. Sizes are checked before anything is decoded: the image, and the tiles
    of a TIFF and the images inside an ICO, each against ``max_pixels``; ``budget`` (a
    PixelBudget) also counts them against the request's total. With ``keep`` (width, height),
    the smallest size the model can use, a JPEG is decoded at a reduced scale and any other
    image reduced by a whole factor right after decoding, never below ``keep``: large uploads
    then cost little memory and time.
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
    if isinstance(image, JpegImagePlugin.JpegImageFile):
        _draft_jpeg(image, filename, budget, keep)
    else:
        budget.check(filename, *image.size)
    decoded = image.width * image.height
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        decoded = max(decoded, _tiff_tile_pixels(image, filename, budget))
    budget.spend(filename, decoded)
    try:
        image.seek(0)
        image.load()
    except Exception as exc:  # truncated or corrupt data: each decoder has its own error types
        raise ImageError(filename, f"the image data is corrupt or truncated ({exc})") from None
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise ImageError(filename, "some pixels are not finite numbers (NaN or infinity)")
    if keep:
        image = _reduce(image, keep)
    return ImageOps.exif_transpose(image)


def _draft_jpeg(image, filename, budget, keep):
    """Have libjpeg decode ``image`` at the smallest scale (1, 1/2, 1/4, 1/8) that keeps ``keep``,
    then check what it will decode: the declared size may be larger, within bounds."""
    progressive = "progressive" in image.info or "progression" in image.info
    if not keep or progressive:
        budget.check(filename, *image.size)
        if keep:
            image.draft(None, keep)
        return
    budget.check(filename, *image.size, limit=budget.max_pixels * JPEG_DECLARED_FACTOR)
    declared = image.size
    image.draft(None, keep)
    if image.size != declared:
        what = f"the image decoded at 1/{declared[0] // image.width} scale"
        budget.check(filename, *image.size, what=what)
    else:
        budget.check(filename, *image.size)


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
