"""The generator: a job's tiles, validated, counted and published to its queue.

The operator uses parse_spec and count_tiles for status.total; iter_tiles enumerates lazily.
"""

from tilehopper_generator.spec import (
    DEFAULT_MAX_TILES,
    SpecError,
    TileSpec,
    count_tiles,
    iter_tiles,
    parse_spec,
)

__all__ = ["DEFAULT_MAX_TILES", "SpecError", "TileSpec", "count_tiles", "iter_tiles", "parse_spec"]
