"""Where a caption split's images are read from: files under a folder, or encoded bytes held in memory.

A split names each image by a string (CaptionIndex.file_names); an image store turns that name into something
data.transforms.read_image opens (a path or a file object). Stores are pickled to loader workers and to the image
cache's decoding pool, so they hold names, never decoded pixels.
"""
from __future__ import annotations

import io
from pathlib import Path


class ImageFiles:
    """Image files named relative to root; an absolute name is used as it is (a CSV may list either)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def open(self, name: str) -> Path:
        return self.root / name  # pathlib keeps an absolute name as it is

    def describe(self, name: str) -> str:
        """The image as a log line names it."""
        return str(self.root / name)


class MemoryImages:
    """Encoded images (PNG, JPEG, ... bytes) by name: the held-out split of a shard set, read once."""

    def __init__(self, encoded: dict[str, bytes], where: str):
        self.encoded = encoded
        self.root = None
        self.where = where      # the shards they came from, for log lines

    def open(self, name: str) -> io.BytesIO:
        return io.BytesIO(self.encoded[name])

    def describe(self, name: str) -> str:
        return f"{name} in {self.where}"
