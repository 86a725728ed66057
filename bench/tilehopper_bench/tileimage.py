"""The bench's tile pictures: cheap to make, easy to check by eye and by test.

Every tile is a 256x256 palette PNG of about 16 KB (a zoom-20 aerial tile is 10-20 KB). It shows
its "z/x/y" label on a white plate across the middle, over a textured background whose colour
follows x (red) and y (green) and a dark frame, so a mosaic put together wrongly is visible at a
glance; and it carries a tEXt chunk ``tilehopper-tile = x/y/z`` so tests can tell which tile a
file is without any image library (tile_identity).

Making one must cost far less than serving it (the tile server is the ceiling the benchmarks
compare against), so nearly all of a tile is made once per process:

- the background texture is one grid of palette indices, shared by every tile, compressed once;
  a tile's colour lives only in its PLTE chunk (63 bytes);
- the rows of label text are the only ones built per tile: glyph strips rendered once with
  Pillow are joined, and go into the stream as a stored (uncompressed) deflate block of ~3.6 KB:
  deflating them would cost more than everything else a tile needs;
- the zlib stream is a concatenation of independent raw-deflate pieces (each a fresh compressor
  ended on a byte boundary), one IDAT chunk each, so the constant pieces keep their precomputed
  CRCs; the adler32 of the whole is combined arithmetically.
"""

from __future__ import annotations

import functools
import random
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Final

SIZE: Final = 256
TEXT_KEY: Final = "tilehopper-tile"

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_CHARSET: Final = "0123456789/"
_FONT_SIZE: Final = 18
_PAD_X: Final = 6  # white plate around the label
_PAD_Y: Final = 4

# Palette layout: shades of the tile's colour for the texture, then the label's ink levels
# (plate white .. black), then the frame that outlines each tile in a mosaic.
_SHADES: Final = 12
_INK_LEVELS: Final = 4
_INK0: Final = _SHADES
_FRAME: Final = _SHADES + _INK_LEVELS
# How often a pixel is one shade lighter than the smooth texture: this grain sets how well the
# tile compresses, i.e. its size, like the fine detail of an aerial photo.
_GRAIN: Final = 0.07
_COLOUR_CYCLE: Final = 8  # red grows with x, green with y, repeating every 8 tiles
_STRIP: Final = 2  # the plain band behind the label: a dark shade, like a road


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflate_piece(raw: bytes, *, last: bool) -> bytes:
    """A raw deflate piece that needs nothing before it and ends on a byte boundary."""
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    return comp.compress(raw) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _stored_piece(raw: bytes) -> bytes:
    """raw as one uncompressed deflate block: no CPU at all, for the rows that change per tile."""
    return b"\x00" + struct.pack("<HH", len(raw), len(raw) ^ 0xFFFF) + raw


_ADLER_BASE: Final = 65521


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """adler32(a + b) from adler32(a), adler32(b) and len(b) (zlib's adler32_combine)."""
    rem = len2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_BASE
    sum1 = (sum1 + (adler2 & 0xFFFF) + _ADLER_BASE - 1) % _ADLER_BASE
    sum2 = (sum2 + (adler1 >> 16) + (adler2 >> 16) + _ADLER_BASE - rem) % _ADLER_BASE
    return sum1 | (sum2 << 16)


def _background(seed: int) -> list[bytearray]:
    """Palette indices of the shared texture: smooth fields plus fine grain, in a frame."""
    rng = random.Random(seed)
    cells = 16  # a coarse random grid, interpolated: fields and patches, not TV noise
    step = SIZE // cells
    grid = [[rng.random() for _ in range(cells + 1)] for _ in range(cells + 1)]
    rows: list[bytearray] = []
    top = _SHADES - 1
    for py in range(SIZE):
        gy, fy = divmod(py, step)
        ty = fy / step
        row = bytearray(SIZE)
        for px in range(SIZE):
            gx, fx = divmod(px, step)
            tx = fx / step
            a = grid[gy][gx] * (1 - tx) + grid[gy][gx + 1] * tx
            b = grid[gy + 1][gx] * (1 - tx) + grid[gy + 1][gx + 1] * tx
            smooth = a * (1 - ty) + b * ty
            row[px] = min(_SHADES - 1, int(smooth * top) + (rng.random() < _GRAIN))
        row[0] = row[SIZE - 1] = _FRAME
        rows.append(row)
    rows[0][:] = rows[SIZE - 1][:] = bytes([_FRAME]) * SIZE
    return rows


def _glyphs() -> dict[str, list[bytes]]:
    """Each label character as rows of ink palette indices, cropped to the rows with ink.

    Cropping matters: every row of the label is built again, and sent uncompressed, per tile.
    """
    from PIL import Image, ImageDraw, ImageFont  # only when the first tile is made

    font = ImageFont.load_default(size=_FONT_SIZE)
    ascent, descent = font.getmetrics()
    images: dict[str, Image.Image] = {}
    for char in _CHARSET:
        image = Image.new("L", (max(1, round(font.getlength(char))), ascent + descent), 0)
        ImageDraw.Draw(image).text((0, 0), char, fill=255, font=font)
        images[char] = image
    boxes = [box for image in images.values() if (box := image.getbbox())]
    first, last = min(b[1] for b in boxes), max(b[3] for b in boxes)
    ink = bytes(_INK0 + (v * (_INK_LEVELS - 1) + 127) // 255 for v in range(256))
    strips: dict[str, list[bytes]] = {}
    for char, image in images.items():
        width, data = image.width, image.tobytes().translate(ink)
        strips[char] = [data[r * width : (r + 1) * width] for r in range(first, last)]
    return strips


@dataclass(frozen=True, slots=True)
class _Layout:
    """Everything of a tile's zlib stream that depends only on the label's width."""

    idat_above: bytes  # the plate's rows above the text, as a ready IDAT chunk
    idat_below: bytes  # ... and below it
    before: bytes  # the start of each text row (filter byte, strip, plate margin) ...
    after: bytes  # ... and its end
    adler_head: int  # adler32 of every raw byte before the text rows
    adler_tail: int  # adler32 of every raw byte after them
    tail_len: int


class TileMaker:
    """Makes the PNG of any tile; build it once and call it for each tile."""

    def __init__(self, *, seed: int = 2024) -> None:
        self._glyphs = _glyph_pairs(_glyphs())
        self._text_height = len(self._glyphs["0"])
        band_height = self._text_height + 2 * _PAD_Y
        band_top = (SIZE - band_height) // 2
        rows = [b"\x00" + bytes(r) for r in _background(seed)]  # filter type 0 on every row
        self._top = b"".join(rows[:band_top])
        self._bottom = b"".join(rows[band_top + band_height :])
        zlib_header = zlib.compress(b"", 6)[:2]
        self._head = (
            _PNG_SIGNATURE
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", SIZE, SIZE, 8, 3, 0, 0, 0))
        )
        self._idat_top = _chunk(b"IDAT", zlib_header + _deflate_piece(self._top, last=False))
        self._idat_bottom = _chunk(b"IDAT", _deflate_piece(self._bottom, last=True))
        self._iend = _chunk(b"IEND", b"")
        self._palettes = [_chunk(b"PLTE", _palette(x, y))
                          for y in range(_COLOUR_CYCLE) for x in range(_COLOUR_CYCLE)]
        self._layouts: dict[int, _Layout] = {}

    def __call__(self, x: int, y: int, zoom: int) -> bytes:
        label = f"{zoom}/{x}/{y}"
        glyphs = [self._glyphs[label[i : i + 2]] for i in range(0, len(label), 2)]
        text_width = sum(len(g[0]) for g in glyphs)
        layout = self._layouts.get(text_width) or self._layout(text_width)
        # Row r of the text is the r-th row of every glyph side by side (zip does it in C).
        text = b"".join((
            layout.before,
            (layout.after + layout.before).join([b"".join(parts) for parts in zip(*glyphs)]),
            layout.after,
        ))
        adler = adler32_combine(zlib.adler32(text, layout.adler_head), layout.adler_tail,
                                layout.tail_len)
        return b"".join((
            self._head,
            self._palettes[(y % _COLOUR_CYCLE) * _COLOUR_CYCLE + x % _COLOUR_CYCLE],
            _chunk(b"tEXt", f"{TEXT_KEY}\0{x}/{y}/{zoom}".encode()),
            self._idat_top,
            layout.idat_above,
            _chunk(b"IDAT", _stored_piece(text)),
            layout.idat_below,
            self._idat_bottom,
            _chunk(b"IDAT", struct.pack(">I", adler)),
            self._iend,
        ))

    def _layout(self, text_width: int) -> _Layout:
        """The band around text of this width: a plain strip with a white plate in the middle."""
        plate_width = min(SIZE - 2, text_width + 2 * _PAD_X)
        left = (SIZE - plate_width) // 2
        right = SIZE - left - plate_width
        strip = bytes([_STRIP])
        plate = bytes([_INK0])
        text_left = (plate_width - text_width) // 2
        text_right = plate_width - text_width - text_left
        plate_rows = (b"\x00" + strip * left + plate * plate_width + strip * right) * _PAD_Y
        tail = plate_rows + self._bottom
        layout = self._layouts[text_width] = _Layout(
            idat_above=_chunk(b"IDAT", _deflate_piece(plate_rows, last=False)),
            idat_below=_chunk(b"IDAT", _deflate_piece(plate_rows, last=False)),
            before=b"\x00" + strip * left + plate * text_left,
            after=plate * text_right + strip * right,
            adler_head=zlib.adler32(self._top + plate_rows),
            adler_tail=zlib.adler32(tail),
            tail_len=len(tail),
        )
        return layout


def _glyph_pairs(glyphs: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
    """Every character and every pair of characters as rows: a label joins half as many pieces."""
    pairs = {a + b: [ra + rb for ra, rb in zip(glyphs[a], glyphs[b])]
             for a in glyphs for b in glyphs}
    return {**glyphs, **pairs}


def _palette(x: int, y: int) -> bytes:
    """Shades of the tile's colour (red follows x, green follows y), ink levels, frame."""
    red = 40 + (x % _COLOUR_CYCLE) * 200 // (_COLOUR_CYCLE - 1)
    green = 40 + (y % _COLOUR_CYCLE) * 200 // (_COLOUR_CYCLE - 1)
    blue = 90
    out = bytearray()
    for shade in range(_SHADES):
        factor = 0.55 + 0.6 * shade / (_SHADES - 1)
        out += bytes(min(255, int(c * factor)) for c in (red, green, blue))
    for level in range(_INK_LEVELS):
        v = 255 - level * 255 // (_INK_LEVELS - 1)
        out += bytes((v, v, v))
    out += b"\x20\x20\x20"
    return bytes(out)


@functools.cache
def default_maker() -> TileMaker:
    return TileMaker()


def tile_png(x: int, y: int, zoom: int) -> bytes:
    """The bench's PNG for one tile (the caller checks that the tile exists)."""
    return default_maker()(x, y, zoom)


def tile_identity(png: bytes) -> tuple[int, int, int] | None:
    """(x, y, zoom) of a whole, intact bench tile; None for anything else.

    Intact means: PNG signature, every chunk's CRC right, ending with IEND — so a truncated
    download or a file cut short on disk is None even though its tEXt chunk survived.
    """
    if not png.startswith(_PNG_SIGNATURE):
        return None
    pos = len(_PNG_SIGNATURE)
    identity: tuple[int, int, int] | None = None
    while pos + 12 <= len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        kind = png[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > len(png):
            return None
        data = png[pos + 8 : end]
        (crc,) = struct.unpack_from(">I", png, end)
        if zlib.crc32(kind + data) != crc:
            return None
        if kind == b"tEXt":
            key, _, value = data.partition(b"\0")
            if key == TEXT_KEY.encode():
                identity = _parse_identity(value)
        if kind == b"IEND":
            return identity if end + 4 == len(png) else None
        pos = end + 4
    return None


def _parse_identity(value: bytes) -> tuple[int, int, int] | None:
    parts = value.split(b"/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    x, y, zoom = (int(p) for p in parts)
    return x, y, zoom


def render_cpu_seconds(count: int = 10_000) -> float:
    """CPU seconds one distinct tile costs to make (for `make benchmark`: the server's floor)."""
    maker = default_maker()
    start = time.process_time()
    for i in range(count):
        maker(268396 + i % 900, 390159 + i // 900, 20)
    return (time.process_time() - start) / count
