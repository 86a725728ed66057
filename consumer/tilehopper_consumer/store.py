"""The tiles folder: a tile is either absent or whole, never half-written under its own name.

A tile is written to a temp file in the same folder (a rename across file systems is not atomic),
fsynced when asked, then renamed to <x>_<y>_<zoom>.png, and the folder is fsynced so the rename
itself survives a power cut. Only then is the message acked. Temp names start with a dot and end
in .tmp, so nothing that reads tiles (contracts.parse_tile_filename) ever takes one for a tile.
A consumer killed mid-write leaves such a temp file behind; sweep_temp removes old ones.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

from tilehopper.contracts import Tile

TEMP_SUFFIX = ".tmp"


class TileStore:
    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()
        self._prefix = f"{os.uname().nodename}.{os.getpid()}"
        self._folder_sync = _GroupSync(self.root)

    def path(self, tile: Tile) -> Path:
        return self.root / tile.filename

    def has(self, tile: Tile) -> bool:
        """On disk and not empty (an empty file is what a power cut can leave without fsync)."""
        try:
            return os.stat(self.root / tile.filename).st_size > 0
        except FileNotFoundError:
            return False

    def save(self, tile: Tile, body: bytes) -> None:
        """Put the tile durably in place; blocking (the consumer runs it in a thread)."""
        final = self.root / tile.filename
        temp = self.root / f".{tile.filename}.{self._prefix}.{next(self._counter)}{TEMP_SUFFIX}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if self.fsync:
            self._sync_folder()

    def _sync_folder(self) -> None:
        self._folder_sync.sync()

    def sweep_temp(self, *, older_than_s: float = 600.0) -> int:
        """Remove temp files left by killed consumers. Old ones only: others may be writing now."""
        removed = 0
        cutoff = time.time() - older_than_s
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                    try:
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed


class _GroupSync:
    """fsync of the folder shared by concurrent savers (a group commit).

    A saver's rename is durable once an fsync of the folder that *started after* the rename has
    finished. Savers arriving while one fsync runs wait for the next one, which covers them all:
    one folder fsync per batch instead of one per tile.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cond = threading.Condition()
        self._requested = 0
        self._synced = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._synced < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                target = self._requested
                synced = False
                self._cond.release()
                try:
                    fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    synced = True
                finally:
                    self._cond.acquire()
                    self._running = False
                    if synced:
                        self._synced = max(self._synced, target)
                    self._cond.notify_all()
