"""Image files of every kind a client may send, good and hostile, made in memory."""

import struct
import zlib

import numpy as np
from PIL import Image

from tests.support import digit_image, encode


def digit_png(index=0):
    """A real handwritten digit as a 28x28 8-bit PNG, with its true label."""
    image, label = digit_image(index)
    return encode(image, "PNG"), label


def rgb_digit(index=0):
    image, label = digit_image(index)
    return image.convert("RGB"), label


def png(index=0):
    return digit_png(index)[0]


def jpeg(index=0):
    return encode(rgb_digit(index)[0], "JPEG", quality=95)


def gif(index=0):
    return encode(digit_image(index)[0].convert("P"), "GIF")


def animated_gif(index=0):
    """A two-frame GIF whose first frame is the digit and whose second is blank."""
    first = digit_image(index)[0].convert("P")
    blank = Image.new("P", first.size, 0)
    return encode(first, "GIF", save_all=True, append_images=[blank], duration=100, loop=0)


def bmp(index=0):
    return encode(digit_image(index)[0], "BMP")


def webp(index=0):
    return encode(rgb_digit(index)[0], "WEBP", lossless=True)


def tiff(index=0):
    return encode(digit_image(index)[0], "TIFF")


def rgba_png(index=0):
    """The digit as opaque white strokes on a transparent background."""
    gray = digit_image(index)[0]
    rgba = Image.merge("RGBA", (gray, gray, gray, gray))
    return encode(rgba, "PNG")


def palette_png_with_transparency(index=0):
    gray = digit_image(index)[0]
    palette = gray.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    background = palette.getpixel((0, 0))
    return encode(palette, "PNG", transparency=background)


def png_16bit(index=0):
    gray = np.asarray(digit_image(index)[0], dtype=np.uint16) * 257
    return encode(Image.fromarray(gray), "PNG")


def cmyk_jpeg(index=0):
    return encode(rgb_digit(index)[0].convert("CMYK"), "JPEG", quality=95)


def exif_rotated_jpeg(index=0):
    """A JPEG stored rotated, with EXIF orientation 6 saying how to turn it upright."""
    upright = rgb_digit(index)[0]
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 = rotate 270 to view
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def one_pixel_png():
    return encode(Image.new("L", (1, 1), 255), "PNG")


def truncated(data, keep=0.5):
    return data[: int(len(data) * keep)]


def text_as_png():
    return b"this is not an image, whatever its name says\n"


def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side=20000):
    """A valid, fully compressed ``side`` x ``side`` 1-bit PNG: tens of KB on the wire, 400 MP decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


# Every kind of valid upload the service accepts, by name: (bytes, true label).
VALID_KINDS = {
    "png": lambda: digit_png(0),
    "jpeg": lambda: (jpeg(0), digit_png(0)[1]),
    "gif": lambda: (gif(0), digit_png(0)[1]),
    "animated_gif": lambda: (animated_gif(0), digit_png(0)[1]),
    "bmp": lambda: (bmp(0), digit_png(0)[1]),
    "webp": lambda: (webp(0), digit_png(0)[1]),
    "tiff": lambda: (tiff(0), digit_png(0)[1]),
    "rgba_png": lambda: (rgba_png(0), digit_png(0)[1]),
    "palette_png_transparency": lambda: (palette_png_with_transparency(0), digit_png(0)[1]),
    "png_16bit": lambda: (png_16bit(0), digit_png(0)[1]),
    "cmyk_jpeg": lambda: (cmyk_jpeg(0), digit_png(0)[1]),
    "exif_rotated_jpeg": lambda: (exif_rotated_jpeg(0), digit_png(0)[1]),
}
