"""What a format reader returns (each image's name and captions, in order) and the column and caption parsing the
table-like formats (imagefolder metadata, CSV, saved Hugging Face datasets) share."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from configs.errors import UserError

logger = logging.getLogger(__name__)

# Tried in this order when data.image_column / data.caption_column keep their defaults: Hugging Face's imagefolder
# names (file_name, text), open_clip's CSV keys (filepath, title) and the usual alternatives. A column the user
# names is used alone.
IMAGE_COLUMNS = ("file_name", "filepath", "image", "image_path", "path")
CAPTION_COLUMNS = ("text", "caption", "captions", "title")


@dataclass
class Listing:
    """One file's or folder's images in order: names[i] (in `images`, an image store from data/image_files.py)
    with captions[i] (possibly empty). skipped counts entries left out (no image name, or a caption that is not
    text); where names the file or folder in messages."""
    names: list[str]
    captions: list[list[str]]
    images: object
    where: str
    skipped: int = 0


def pick_column(columns: list[str], wanted: str, default: str, fallbacks: tuple[str, ...], what: str,
                setting: str, where: str) -> str:
    """The column holding `what`: `wanted` if present; while it is the default, the first fallback present."""
    if wanted in columns:
        return wanted
    if wanted == default:
        found = next((c for c in fallbacks if c in columns), None)
        if found is not None:
            logger.info("%s: reading %s from column '%s'", where, what, found)
            return found
    raise UserError(f"{where} has no {what} column '{wanted}' (its columns: {', '.join(columns) or 'none'}); "
                    f"name the right one with --set data.{setting}=COLUMN")


def caption_list(value, cell: bool = False) -> list[str] | None:
    """A caption field as a list of non-empty captions, or None when it is not text (a number, a null, a list
    holding something else). cell: a CSV cell, where several captions may be written as a JSON list."""
    if cell and isinstance(value, str) and value.startswith("[") and value.rstrip().endswith("]"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass    # a caption that happens to be bracketed
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return [v.strip() for v in value if v.strip()]


def merge_rows(rows, where: str, images) -> Listing:
    """(name, caption field or None when not text) rows -> a Listing; rows that name the same image add captions to
    it (open_clip's CSVs repeat the path once per caption)."""
    order: dict[str, list[str]] = {}
    skipped = 0
    for name, captions in rows:
        if not name or captions is None:
            skipped += 1
            continue
        order.setdefault(name, []).extend(captions)
    return Listing(list(order), list(order.values()), images, where, skipped)


VAL_NAMES = ("val", "validation", "valid", "dev")   # folder and split names taken for data.val_split


def split_aliases(split: str) -> list[str]:
    """The names a split may go by: a val split may also be named validation, valid or dev."""
    return [split] + ([n for n in VAL_NAMES if n != split] if split in VAL_NAMES else [])


def split_folder(folder: Path, split: str) -> Path | None:
    """folder/<split> under any of the split's names."""
    return next((folder / n for n in split_aliases(split) if (folder / n).is_dir()), None)
