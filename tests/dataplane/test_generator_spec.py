"""Tile enumeration and validation, against mercantile; no broker needed."""

from __future__ import annotations

import itertools
import json
import random

import mercantile
import pytest

from tilehopper.contracts import MAX_ZOOM, Tile
from tilehopper_generator.__main__ import main as generator_main
from tilehopper_generator.spec import MAX_LATITUDE, SpecError, count_tiles, iter_tiles, parse_spec


def bbox(west: float, south: float, east: float, north: float, low: int, high: int) -> dict:
    return {"bbox": {"west": west, "south": south, "east": east, "north": north}, "zooms": {"min": low, "max": high}}


def mercantile_set(west: float, south: float, east: float, north: float, low: int, high: int) -> set[Tile]:
    return {Tile(t.x, t.y, t.z) for t in mercantile.tiles(west, south, east, north, list(range(low, high + 1)))}


@pytest.mark.parametrize(
    "box",
    [
        (24.0, 56.9, 24.2, 57.0, 15, 17),  # the design's sample
        (-180.0, -MAX_LATITUDE, 180.0, MAX_LATITUDE, 0, 3),  # the whole world
        (0.0, 0.0, 90.0, 66.51326044311186, 2, 2),  # exactly one z2 tile's bounds... and edges
        (-0.0001, -0.0001, 0.0001, 0.0001, 10, 12),  # around the origin: four tiles per zoom
        (179.9, 85.0, 180.0, MAX_LATITUDE, 5, 8),  # the north-east corner of the world
    ],
)
def test_bbox_matches_mercantile(box: tuple) -> None:
    spec = parse_spec(bbox(*box))
    tiles = list(iter_tiles(spec))
    assert len(tiles) == len(set(tiles)), "no duplicates"
    assert set(tiles) == mercantile_set(*box)
    assert count_tiles(spec) == len(tiles)


def test_bbox_on_tile_edges_takes_no_neighbour() -> None:
    bounds = mercantile.bounds(mercantile.Tile(1234, 2345, 12))
    spec = parse_spec(bbox(bounds.west, bounds.south, bounds.east, bounds.north, 12, 12))
    assert list(iter_tiles(spec)) == [Tile(1234, 2345, 12)]
    assert count_tiles(spec) == 1


def test_random_bboxes_count_equals_enumeration() -> None:
    rng = random.Random(7)
    for _ in range(200):
        west, east = sorted(rng.uniform(-180, 180) for _ in range(2))
        south, north = sorted(rng.uniform(-MAX_LATITUDE, MAX_LATITUDE) for _ in range(2))
        low = rng.randrange(0, 8)
        box = (west, south, east, north, low, low + rng.randrange(0, 3))
        spec = parse_spec(bbox(*box), max_tiles=10**9)
        assert count_tiles(spec) == len(mercantile_set(*box)), box


def test_square_is_the_original_shape_streamed() -> None:
    spec = parse_spec({"square": {"x": 268396, "y": 390159, "zoom": 20, "width": 900, "height": 900}})
    assert count_tiles(spec) == 810_000
    tiles = iter_tiles(spec)
    assert not isinstance(tiles, list | tuple)
    first = list(itertools.islice(tiles, 901))
    assert first[0] == Tile(268396, 390159, 20)
    assert first[899] == Tile(268396 + 899, 390159, 20)
    assert first[900] == Tile(268396, 390160, 20)


def test_square_edges() -> None:
    spec = parse_spec({"square": {"x": 6, "y": 7, "zoom": 3, "width": 2, "height": 1}})
    assert list(iter_tiles(spec)) == [Tile(6, 7, 3), Tile(7, 7, 3)]


def test_list_drops_duplicates_keeps_order() -> None:
    spec = parse_spec({"list": [{"x": 1, "y": 2, "zoom": 3}, {"x": 0, "y": 0, "zoom": 0}, {"x": 1, "y": 2, "zoom": 3}]})
    assert list(iter_tiles(spec)) == [Tile(1, 2, 3), Tile(0, 0, 0)]
    assert count_tiles(spec) == 2


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"square": {"x": 8, "y": 0, "zoom": 3, "width": 1, "height": 1}}, "tiles.square.x: must be within 0..7 at zoom 3, got 8"),
        ({"square": {"x": 0, "y": 8, "zoom": 3, "width": 1, "height": 1}}, "tiles.square.y: must be within 0..7 at zoom 3, got 8"),
        ({"square": {"x": -1, "y": 0, "zoom": 3, "width": 1, "height": 1}}, "tiles.square.x: must be within 0..7 at zoom 3, got -1"),
        ({"square": {"x": 6, "y": 0, "zoom": 3, "width": 3, "height": 1}}, "tiles.square.width: must be within 1..2 from 6 at zoom 3, got 3"),
        ({"square": {"x": 0, "y": 0, "zoom": 3, "width": 1, "height": 0}}, "tiles.square.height: must be within 1..8 from 0 at zoom 3, got 0"),
        ({"square": {"x": 0, "y": 0, "zoom": MAX_ZOOM + 1, "width": 1, "height": 1}}, f"tiles.square.zoom: must be within 0..{MAX_ZOOM}, got {MAX_ZOOM + 1}"),
        ({"square": {"x": 0, "y": 0, "zoom": -1, "width": 1, "height": 1}}, f"tiles.square.zoom: must be within 0..{MAX_ZOOM}, got -1"),
        ({"square": {"x": "0", "y": 0, "zoom": 1, "width": 1, "height": 1}}, "tiles.square.x: must be an integer, got '0'"),
        (bbox(24.2, 56.9, 24.0, 57.0, 1, 2), "tiles.bbox.west: must be less than east (24.0), got 24.2"),
        (bbox(24.0, 56.9, 24.0, 57.0, 1, 2), "tiles.bbox.west: must be less than east (24.0), got 24.0"),
        (bbox(24.0, 57.0, 24.2, 56.9, 1, 2), "tiles.bbox.south: must be less than north (56.9), got 57.0"),
        (bbox(24.0, 56.9, 24.2, 86.0, 1, 2), f"tiles.bbox.north: must be within the Web-Mercator range -{MAX_LATITUDE}..{MAX_LATITUDE}, got 86.0"),
        (bbox(24.0, -90.0, 24.2, 57.0, 1, 2), f"tiles.bbox.south: must be within the Web-Mercator range -{MAX_LATITUDE}..{MAX_LATITUDE}, got -90.0"),
        (bbox(-181.0, 56.9, 24.2, 57.0, 1, 2), "tiles.bbox.west: must be within -180..180, got -181.0"),
        (bbox(24.0, 56.9, 24.2, 57.0, 3, 2), "tiles.zooms.min: must not exceed zooms.max (2), got 3"),
        (bbox(24.0, 56.9, 24.2, 57.0, 1, MAX_ZOOM + 1), f"tiles.zooms.max: must be within 0..{MAX_ZOOM}, got {MAX_ZOOM + 1}"),
        ({"bbox": {"west": 1, "south": 1, "east": 2, "north": 2}}, "tiles.zooms: a bbox needs zooms {min, max}"),
        ({"list": []}, "tiles.list: selects no tiles"),
        ({"list": [{"x": 2, "y": 0, "zoom": 1}]}, "tiles.list[0]: x must be within 0..1 at zoom 1, got 2"),
        ({"list": [{"x": 0, "y": 0}]}, "tiles.list[0].zoom: must be an integer, got None"),
        ({}, "tiles.: exactly one of bbox, square, list is required, got none"),
        ({"list": [{"x": 0, "y": 0, "zoom": 0}], "square": {"x": 0, "y": 0, "zoom": 0, "width": 1, "height": 1}},
         "exactly one of bbox, square, list is required, got ['square', 'list']"),
    ],
)
def test_bad_input_is_rejected_with_its_field_and_range(doc: dict, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(doc)
    assert message in str(caught.value)


def test_more_tiles_than_the_maximum_is_rejected() -> None:
    doc = {"square": {"x": 268396, "y": 390159, "zoom": 20, "width": 900, "height": 900}}
    with pytest.raises(SpecError, match=r"tiles.square: selects 810000 tiles, more than the maximum of 100000"):
        parse_spec(doc, max_tiles=100_000)


def test_cli_rejects_before_publishing_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    # An unreachable broker URL: had the generator tried to publish, it would exit 1, not 2.
    bad = ["--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2F", "--queue", "q"]
    assert generator_main(["--square", "0,0,1,3,1", *bad]) == 2
    assert "tiles.square.width: must be within 1..2 from 0 at zoom 1, got 3" in capsys.readouterr().err
    assert generator_main(["--bbox", "1,2,3", "--zooms", "1-2", *bad]) == 2
    assert "--bbox needs W,S,E,N" in capsys.readouterr().err
    assert generator_main(["--square", "0,0,1,1,1", "--list", "x.json", *bad]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert generator_main(["--tiles-json", "{nope", *bad]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_cli_dry_run_counts(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert generator_main(["--bbox", "24,56.9,24.2,57", "--zooms", "15-17", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["total"] == len(mercantile_set(24, 56.9, 24.2, 57, 15, 17))
    monkeypatch.setenv("TILEHOPPER_TILES", json.dumps({"square": {"x": 0, "y": 0, "zoom": 2, "width": 4, "height": 2}}))
    assert generator_main(["--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"published": 0, "total": 8, "dry_run": True}
