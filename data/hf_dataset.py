"""A Hugging Face dataset saved with save_to_disk (a Dataset, or a DatasetDict of splits): an image column (the
Image feature, as diffusers' scripts use, or paths) and a caption column (a string or a list of strings).

Read with the `datasets` library, memory-mapped: images stay encoded in its arrow files until one is read.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from configs.errors import UserError
from data.image_files import ImageFiles
from data.listing import CAPTION_COLUMNS, IMAGE_COLUMNS, Listing, caption_list, pick_column

DICT_FILE, STATE_FILE = "dataset_dict.json", "state.json"   # what save_to_disk writes for a DatasetDict / Dataset
_OPEN: dict[tuple[str, str], object] = {}   # per process: a worker opens each split's arrow files once


def is_saved_dataset(folder: Path) -> bool:
    return (folder / DICT_FILE).is_file() or (folder / STATE_FILE).is_file()


def split_names(folder: Path) -> list[str] | None:
    """The splits of a saved DatasetDict, or None for a single saved Dataset."""
    if not (folder / DICT_FILE).is_file():
        return None
    try:
        return list(json.loads((folder / DICT_FILE).read_text())["splits"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / DICT_FILE} is not the index save_to_disk writes; save the dataset again") from None


def _load(path: Path):
    import datasets   # heavy (pyarrow, pandas): only for this format

    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UserError(f"{path} is not a dataset saved with save_to_disk ({err}); save it with "
                        f"Dataset.save_to_disk or set data.format") from None


class HFImages:
    """Images in a saved dataset's image column, named by row number (pickles as its path, for loader workers)."""

    def __init__(self, path: Path, column: str):
        self.path, self.column = Path(path), column
        self.root = None

    def _column(self):
        key = (str(self.path), self.column)
        if key not in _OPEN:
            import datasets

            table = _load(self.path).select_columns([self.column])
            _OPEN[key] = table.cast_column(self.column, datasets.Image(decode=False))  # encoded bytes, not PIL
        return _OPEN[key]

    def open(self, name: str):
        value = self._column()[int(name)][self.column]
        if value is None:
            raise ValueError("no image in this row")   # one of IMAGE_ERRORS: counted like an unreadable file
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        return self.path / value["path"]               # an image saved by reference

    def describe(self, name: str) -> str:
        return f"row {name} of {self.path}"


def read_saved_split(path: Path, data) -> Listing:
    """One saved Dataset (a folder save_to_disk wrote) as a Listing (data: cfg.data)."""
    import datasets

    dataset = _load(path)
    if isinstance(dataset, datasets.DatasetDict):
        raise UserError(f"{path} holds the splits {', '.join(dataset)}; give its folder, not a split's parent")
    columns = dataset.column_names
    image = pick_column(columns, data.image_column, "file_name", IMAGE_COLUMNS, "image", "image_column", str(path))
    caption = pick_column(columns, data.caption_column, "text", CAPTION_COLUMNS, "caption", "caption_column",
                          str(path))
    feature = dataset.features[image]
    captions = [caption_list(value) for value in dataset[caption]]
    if isinstance(feature, datasets.Image):
        names, images = [str(row) for row in range(len(dataset))], HFImages(path, image)
    elif getattr(feature, "dtype", None) == "string":
        names, images = [p or "" for p in dataset[image]], ImageFiles(path)
    else:
        raise UserError(f"column '{image}' of {path} holds {feature}, neither images nor paths; name the image "
                        f"column with --set data.image_column=COLUMN")
    keep = [i for i, (n, c) in enumerate(zip(names, captions)) if n and c is not None]
    return Listing([names[i] for i in keep], [captions[i] for i in keep], images, str(path),
                   skipped=len(names) - len(keep))
