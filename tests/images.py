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


def ico_with_png(embedded, declared=16):
    """An ICO whose one directory entry says ``declared`` x ``declared`` but holds the PNG ``embedded``."""
    side = declared % 256  # 0 means 256 in an ICO directory
    entry = struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(embedded), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + embedded


def ico_bomb(side=40000):
    """A 16x16 icon by its directory whose embedded PNG is ``side`` x ``side``: Pillow decodes it in open()."""
    return ico_with_png(bomb_png(side))


def _tiff(width, height, tags, data, bits=8, sample_format=1):
    """A little-endian one-IFD grayscale TIFF: ``tags`` adds to or replaces the basic ones."""
    entries = {
        256: (4, width),  # ImageWidth, LONG
        257: (4, height),  # ImageLength
        258: (3, bits),  # BitsPerSample, SHORT
        259: (3, 1),  # Compression: none
        262: (3, 1),  # PhotometricInterpretation: BlackIsZero
        277: (3, 1),  # SamplesPerPixel
        339: (3, sample_format),  # SampleFormat: 1 unsigned, 3 IEEE float
        **tags,
    }
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, (kind, value) in sorted(entries.items()):
        if value == "DATA_OFFSET":
            value = data_offset
        elif value == "DATA_LENGTH":
            value = len(data)
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\0" + struct.pack("<I", ifd_offset) + ifd + b"\0\0\0\0" + data


def tiff_tile_bomb(tile=46336, real=False):
    """A 16x16 TIFF stored as one deflate tile declared ``tile`` x ``tile``.

    Tiny (a few hundred bytes) unless ``real``: then the tile's data really inflates to
    ``tile``² bytes, about a thousandth of that on the wire.
    """
    compressor = zlib.compressobj(9)
    if real:
        row = b"\0" * tile
        data = b"".join(compressor.compress(row) for _ in range(tile)) + compressor.flush()
    else:
        data = compressor.compress(b"\0" * 1024) + compressor.flush()
    tags = {
        259: (3, 8),  # Compression: deflate
        322: (4, tile),  # TileWidth
        323: (4, tile),  # TileLength
        324: (4, "DATA_OFFSET"),  # TileOffsets
        325: (4, "DATA_LENGTH"),  # TileByteCounts
    }
    return _tiff(16, 16, tags, data)


def float_tiff(value, side=28):
    """A ``side`` x ``side`` 32-bit float TIFF (Pillow mode F) filled with ``value`` (NaN, inf...)."""
    return encode(Image.fromarray(np.full((side, side), value, dtype=np.float32), mode="F"), "TIFF")


def flat_png(mode, side, **params):
    """A ``side`` x ``side`` PNG of one colour in ``mode``: tiny on the wire, ``side``² pixels to decode."""
    return encode(Image.new(mode, (side, side), 1), "PNG", compress_level=9, **params)


def ico_with_bmp(width, height):
    """An ICO of 16x16 by its directory whose one entry is a BMP header declaring ``width`` x ``height``."""
    # BITMAPINFOHEADER; an icon's height counts its image and its mask. No pixel data follows.
    header = struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, 32, 0, 0, 0, 0, 0, 0)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(header), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + header


def gif_frame_bomb(side=20000):
    """A GIF whose screen is 16x16 but whose first frame is ``side`` x ``side`` (Pillow grows the image to it)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"
