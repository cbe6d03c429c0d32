"""Tables of image paths and captions: an image folder's metadata.jsonl or metadata.csv (Hugging Face's imagefolder,
what diffusers' text-to-image scripts read) and CSV/TSV files (open_clip's --csv-img-key / --csv-caption-key).

Rows naming the same image add captions to it; a caption field may hold a list of captions (a JSON list in a
CSV cell). Paths are relative to the table's folder unless absolute.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from configs.errors import UserError
from data.image_files import ImageFiles
from data.listing import CAPTION_COLUMNS, IMAGE_COLUMNS, Listing, caption_list, merge_rows, pick_column

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CSV_SUFFIXES = (".csv", ".tsv", ".tab")
DEFAULT_IMAGE_COLUMN = "file_name"
DEFAULT_CAPTION_COLUMN = "text"


def metadata_file(folder: Path) -> Path | None:
    """The folder's metadata.jsonl (preferred) or metadata.csv, if it has one."""
    return next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)


def read_image_folder(folder: Path, data) -> Listing:
    """The images an image folder's metadata file lists, with their captions (data: cfg.data)."""
    path = metadata_file(folder)
    if path is None:
        raise UserError(f"{folder} has no {' or '.join(METADATA_FILES)}; write one with a '{data.image_column}' and "
                        f"a '{data.caption_column}' field per image, or set data.format")
    if path.suffix == ".csv":
        return read_table(path, data, separator=",")
    return _read_jsonl(path, data)


def read_table(path: Path, data, separator: str | None = None) -> Listing:
    """A CSV/TSV file of image paths and captions; separator None: data.csv_separator, else by the suffix."""
    separator = separator or csv_separator(path, data.csv_separator)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = list(reader.fieldnames or [])
            image, caption = _columns(columns, data, path)
            rows = [(row.get(image) or "", caption_list(row.get(caption), cell=True)) for row in reader]
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except csv.Error as err:
        raise UserError(f"{path} is not a readable CSV ({err}); check data.csv_separator") from None
    return merge_rows(((name.strip(), captions) for name, captions in rows), str(path), ImageFiles(path.parent))


def csv_separator(path: Path, setting: str) -> str:
    """data.csv_separator as one character: empty is a tab for .tsv/.tab files, else a comma; 'tab' or '\\t' is a
    tab (a shell passes the two characters)."""
    if setting in ("tab", "\\t", "\t"):
        return "\t"
    if setting:
        return setting
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _columns(columns: list[str], data, path: Path) -> tuple[str, str]:
    image = pick_column(columns, data.image_column, DEFAULT_IMAGE_COLUMN, IMAGE_COLUMNS, "image", "image_column",
                        str(path))
    caption = pick_column(columns, data.caption_column, DEFAULT_CAPTION_COLUMN, CAPTION_COLUMNS, "caption",
                          "caption_column", str(path))
    return image, caption


def _read_jsonl(path: Path, data) -> Listing:
    records = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not JSON ({err.msg}); each line must be one object like "
                            f'{{"file_name": "0001.png", "text": "a caption"}}') from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is not a JSON object; each line must be one object like "
                            f'{{"file_name": "0001.png", "text": "a caption"}}')
        records.append(record)
    columns = list(dict.fromkeys(key for record in records[:100] for key in record))
    image, caption = _columns(columns, data, path)
    rows = ((r.get(image) if isinstance(r.get(image), str) else "", caption_list(r.get(caption))) for r in records)
    return merge_rows(rows, str(path), ImageFiles(path.parent))
