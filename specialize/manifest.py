"""What fine-tuning hands to --mode compare: <out>/finetune/manifest.json names the backend, the base, the method,
the data, the tuned model and/or the adapter (paths relative to the manifest), sampling defaults, steps and metrics."""
from __future__ import annotations

import json
from pathlib import Path

from common.files import atomic_write_text
from configs.errors import UserError

MANIFEST_FILE = "manifest.json"
FORMAT = 1
PATH_KEYS = ("model", "adapter", "decoder_adapter")   # relative to the manifest's folder


def write_manifest(folder: Path, manifest: dict) -> Path:
    """manifest's PATH_KEYS are paths inside folder; written relative to it, so the folder can move."""
    tree = {"format": FORMAT, **manifest}
    for key in PATH_KEYS:
        if key in tree:
            tree[key] = str(Path(tree[key]).relative_to(folder))
    return atomic_write_text(folder / MANIFEST_FILE, json.dumps(tree, indent=2))


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a fine-tuning folder, its PATH_KEYS as Paths; UserError when it is missing or damaged."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable fine-tuning manifest ({type(err).__name__}); run --mode "
                        "finetune again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a fine-tuning manifest of format {FORMAT}")
    for key in PATH_KEYS:
        if key in manifest:
            manifest[key] = path.parent / manifest[key]
    return manifest
