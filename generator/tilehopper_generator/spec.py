"""Which tiles a job wants: the TileJob's spec.tiles, validated, counted and enumerated lazily.

Exactly one shape: a bbox (lon/lat) with a zoom range, the original square (x, y, zoom, width,
height), or an explicit list. Every error names the field and the allowed range, and is raised
before anything is published.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import mercantile

from tilehopper.contracts import MAX_ZOOM, Tile, tile_problem

# mercantile's own limit of the Web-Mercator projection.
MAX_LATITUDE: Final = 85.0511287798066
DEFAULT_MAX_TILES: Final = 1_000_000


class SpecError(ValueError):
    """A spec that cannot be published; the message names the field and what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"tiles.{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class BBoxSpec:
    west: float
    south: float
    east: float
    north: float
    min_zoom: int
    max_zoom: int


@dataclass(frozen=True, slots=True)
class SquareSpec:
    x: int
    y: int
    zoom: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ListSpec:
    tiles: tuple[Tile, ...]  # duplicates already removed, first occurrence kept


TileSpec = BBoxSpec | SquareSpec | ListSpec


def _number(doc: Mapping[str, Any], key: str, where: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{where}.{key}", f"must be a number, got {value!r}")
    return float(value)


def _integer(doc: Mapping[str, Any], key: str, where: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}.{key}", f"must be an integer, got {value!r}")
    return value


def _zoom(value: int, field: str) -> int:
    if not 0 <= value <= MAX_ZOOM:
        raise SpecError(field, f"must be within 0..{MAX_ZOOM}, got {value}")
    return value


def parse_spec(doc: Any, *, max_tiles: int = DEFAULT_MAX_TILES) -> TileSpec:
    """Validate a TileJob spec.tiles object; raises SpecError naming the field."""
    if not isinstance(doc, Mapping):
        raise SpecError("", f"must be an object with one of bbox, square, list; got {type(doc).__name__}")
    shapes = [key for key in ("bbox", "square", "list") if doc.get(key) is not None]
    if len(shapes) != 1:
        raise SpecError("", f"exactly one of bbox, square, list is required, got {shapes or 'none'}")
    spec: TileSpec
    if shapes[0] == "bbox":
        spec = _parse_bbox(doc)
    elif shapes[0] == "square":
        spec = _parse_square(doc["square"])
    else:
        spec = _parse_list(doc["list"])
    total = count_tiles(spec)
    if total == 0:
        raise SpecError(shapes[0], "selects no tiles")
    if total > max_tiles:
        raise SpecError(shapes[0], f"selects {total} tiles, more than the maximum of {max_tiles}")
    return spec


def _parse_bbox(doc: Mapping[str, Any]) -> BBoxSpec:
    box = doc["bbox"]
    if not isinstance(box, Mapping):
        raise SpecError("bbox", "must be an object {west, south, east, north}")
    west, south, east, north = (_number(box, k, "bbox") for k in ("west", "south", "east", "north"))
    for key, value in (("west", west), ("east", east)):
        if not -180.0 <= value <= 180.0:
            raise SpecError(f"bbox.{key}", f"must be within -180..180, got {value}")
    for key, value in (("south", south), ("north", north)):
        if not -MAX_LATITUDE <= value <= MAX_LATITUDE:
            raise SpecError(
                f"bbox.{key}", f"must be within the Web-Mercator range -{MAX_LATITUDE}..{MAX_LATITUDE}, got {value}"
            )
    if west >= east:
        raise SpecError("bbox.west", f"must be less than east ({east}), got {west}")
    if south >= north:
        raise SpecError("bbox.south", f"must be less than north ({north}), got {south}")
    zooms = doc.get("zooms")
    if not isinstance(zooms, Mapping):
        raise SpecError("zooms", "a bbox needs zooms {min, max}")
    low = _zoom(_integer(zooms, "min", "zooms"), "zooms.min")
    high = _zoom(_integer(zooms, "max", "zooms"), "zooms.max")
    if low > high:
        raise SpecError("zooms.min", f"must not exceed zooms.max ({high}), got {low}")
    return BBoxSpec(west, south, east, north, low, high)


def _parse_square(doc: Any) -> SquareSpec:
    if not isinstance(doc, Mapping):
        raise SpecError("square", "must be an object {x, y, zoom, width, height}")
    x, y, zoom, width, height = (_integer(doc, k, "square") for k in ("x", "y", "zoom", "width", "height"))
    _zoom(zoom, "square.zoom")
    limit = 1 << zoom
    for key, value in (("x", x), ("y", y)):
        if not 0 <= value < limit:
            raise SpecError(f"square.{key}", f"must be within 0..{limit - 1} at zoom {zoom}, got {value}")
    for key, value, start in (("width", width, x), ("height", height, y)):
        room = limit - start
        if not 1 <= value <= room:
            raise SpecError(f"square.{key}", f"must be within 1..{room} from {start} at zoom {zoom}, got {value}")
    return SquareSpec(x, y, zoom, width, height)


def _parse_list(doc: Any) -> ListSpec:
    if not isinstance(doc, list):
        raise SpecError("list", "must be a list of {x, y, zoom}")
    seen: dict[Tile, None] = {}  # a dict keeps the first-seen order
    for index, item in enumerate(doc):
        where = f"list[{index}]"
        if not isinstance(item, Mapping):
            raise SpecError(where, "must be an object {x, y, zoom}")
        tile = Tile(*(_integer(item, k, where) for k in ("x", "y", "zoom")))
        problem = tile_problem(tile)
        if problem:
            raise SpecError(where, problem)
        seen.setdefault(tile)
    return ListSpec(tuple(seen))


def _bbox_corners(spec: BBoxSpec, zoom: int) -> tuple[int, int, int, int]:
    """(min x, min y, max x, max y) of the tiles the bbox touches: mercantile.tiles' own corners."""
    upper_left = mercantile.tile(spec.west, spec.north, zoom)
    # mercantile nudges the east/south edge inwards so a bbox ending on a tile edge does not take
    # the next tile; the same epsilon keeps our count equal to its enumeration.
    lower_right = mercantile.tile(spec.east - mercantile.LL_EPSILON, spec.south + mercantile.LL_EPSILON, zoom)
    return upper_left.x, upper_left.y, lower_right.x, lower_right.y


def count_tiles(spec: TileSpec) -> int:
    """How many tiles iter_tiles yields, without enumerating them (the operator's status.total)."""
    if isinstance(spec, SquareSpec):
        return spec.width * spec.height
    if isinstance(spec, ListSpec):
        return len(spec.tiles)
    total = 0
    for zoom in range(spec.min_zoom, spec.max_zoom + 1):
        min_x, min_y, max_x, max_y = _bbox_corners(spec, zoom)
        total += (max_x - min_x + 1) * (max_y - min_y + 1)
    return total


def iter_tiles(spec: TileSpec) -> Iterator[Tile]:
    """Every tile once, lazily: 810,000 tiles never sit in memory as a list."""
    if isinstance(spec, SquareSpec):
        for y in range(spec.y, spec.y + spec.height):
            for x in range(spec.x, spec.x + spec.width):
                yield Tile(x, y, spec.zoom)
    elif isinstance(spec, ListSpec):
        yield from spec.tiles
    else:
        zooms = list(range(spec.min_zoom, spec.max_zoom + 1))
        for t in mercantile.tiles(spec.west, spec.south, spec.east, spec.north, zooms):
            yield Tile(t.x, t.y, t.z)
