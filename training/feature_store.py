"""Where the diffusion phase's frozen features live (train.feature_store).

auto: memory while they fit comfortably in RAM, else disk. memory: computed each time the phase starts, held as
tensors. disk: computed once per frozen weights and dataset,
written under <data.root>/cache/features/<key>/ (a temporary folder renamed into place, under a lock) and read back
as memory maps by every later run that freezes the same weights on the same data: a resumed run, a second run from
the same joint checkpoint, fine-tuning again on the same domain, bench/t2i_levers.py. The operating system pages the
maps in and out, so the features need not fit in RAM.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import psutil
import torch

from configs.errors import UserError
from training.features import FrozenFeatures, build_frozen_features, cached_caption_rows

STORES = ("auto", "memory", "disk")
RAM_SHARE = 0.25     # auto keeps the features in memory while they take at most this share of the free RAM
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _digest_tensors(digest, state: dict) -> None:
    for name in sorted(state):
        value = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")


def features_key(model, dataset, captions_per_image: int) -> str:
    """20 hex digits naming what the features are a function of: the frozen weights (image encoder, BERT, the
    latent scale), the dataset (its source and every caption's token ids) and how many captions per image."""
    digest = hashlib.sha1(f"v{FORMAT_VERSION}|captions={captions_per_image}".encode())
    _digest_tensors(digest, model.image_encoder.state_dict())
    _digest_tensors(digest, model.text_encoder.bert.state_dict())
    _digest_tensors(digest, {"latent_scale": model.latent_scale})
    source = getattr(dataset, "manifest", {}).get("source") or {
        "image_dir": str(Path(dataset.image_dir).resolve()), "mtime": Path(dataset.image_dir).stat().st_mtime_ns}
    digest.update(json.dumps({"source": source, "image_size": dataset.image_size}, sort_keys=True).encode())
    for array in (dataset.input_ids, dataset.attention_mask, dataset.index.caption_image, dataset.index.image_ids):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:20]


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text())["format_version"] == FORMAT_VERSION
    except (OSError, ValueError, KeyError):
        return False


class _DiskArrays:
    """An allocate() for build_frozen_features: each field a .npy memory map in folder, filled in place, so the
    features never need to fit in RAM."""

    def __init__(self, folder: Path):
        self.folder, self.arrays = folder, []

    def __call__(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        array = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", shape=shape,
                                          dtype=torch.empty((), dtype=dtype).numpy().dtype)
        self.arrays.append(array)
        return torch.from_numpy(array)

    def close(self, features: FrozenFeatures) -> None:
        for array in self.arrays:
            array.flush()
        (self.folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "captions": len(features),
                                                        "bytes": features.nbytes}))   # last: marks it complete


def _read(folder: Path) -> FrozenFeatures:
    return FrozenFeatures(**{f.name: np.load(folder / f"{f.name}.npy", mmap_mode="r")
                             for f in fields(FrozenFeatures)})


def estimated_bytes(model, dataset, captions_per_image: int) -> int:
    """What the features of (model, dataset) will take, from their shapes (before computing them)."""
    from models.image_encoder import TOKEN_GRID

    captions = len(cached_caption_rows(dataset.caption_offsets, captions_per_image))
    per_image = 4 * (int(np.prod(model.latent_shape)) + TOKEN_GRID ** 2 * model.image_encoder.token_dim)
    per_caption = dataset.input_ids.shape[1] * (2 * model.text_encoder.bert.config.hidden_size + 8) + 8
    return dataset.num_images * (per_image + 1) + captions * per_caption


def choose_store(store: str, model, dataset, captions_per_image: int) -> str:
    """auto: memory while the features take at most RAM_SHARE of the free RAM, else disk."""
    if store not in STORES:
        raise UserError(f"train.feature_store must be {', '.join(STORES)}, got '{store}'")
    if store != "auto":
        return store
    fits = estimated_bytes(model, dataset, captions_per_image) <= RAM_SHARE * psutil.virtual_memory().available
    return "memory" if fits else "disk"


def load_features(store: str, root: str | Path, model, dataset, captions_per_image: int, device: torch.device,
                  autocast) -> tuple[FrozenFeatures, str]:
    """The features of (model, dataset) from the store, computed when it has none; (features, how they came)."""
    store = choose_store(store, model, dataset, captions_per_image)
    if store == "memory":
        return build_frozen_features(model, dataset, captions_per_image, device, autocast), "computed"
    from common.files import write_folder

    folder = Path(root) / "cache" / "features" / features_key(model, dataset, captions_per_image)
    computed = []

    def write(tmp: Path) -> None:
        computed.append(True)
        arrays = _DiskArrays(tmp)
        arrays.close(build_frozen_features(model, dataset, captions_per_image, device, autocast, arrays))

    write_folder(folder, write, is_complete=_is_complete, lock=True)
    return _read(folder), f"{'computed and written to' if computed else 'read from'} {folder}"
