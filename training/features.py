"""Frozen features for the diffusion phase: what the UNet and the two decoders need from the frozen encoders.

After the joint phase the image encoder, BERT and the alignment heads stop changing, so what the UNet and the
decoders need from them is a fixed function of the data: each training image's latents and caption-decoder tokens,
and the frozen-BERT states of its captions. Computing those once turns the UNet's step from "the whole model" into
"the UNet alone" (about 4x the samples per second on 2 CPU cores). training/feature_store.py keeps them in memory or
on disk.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ENCODE_BATCH = 256
BERT_BATCH = 512
GPU_SHARE = 0.25     # the features move to the GPU when they take at most this share of its free memory


@dataclass
class FrozenFeatures:
    """Per image i: latents[i] (Lc, h, w), already times latent_scale; tokens[i] (M, C), the caption decoder's
    memory; readable[i]. Per cached caption j: hidden[j] (T, H) BERT's last hidden states (fp16, zero past
    mask[j]), mask[j] (T,) and image[j], the position of its image. Each field is a torch tensor (in memory, on
    any device) or a numpy array (a memory map of the disk store): rows are gathered with `take`."""
    latents: torch.Tensor | np.ndarray
    tokens: torch.Tensor | np.ndarray
    readable: torch.Tensor | np.ndarray
    hidden: torch.Tensor | np.ndarray
    mask: torch.Tensor | np.ndarray
    image: torch.Tensor | np.ndarray

    def __len__(self) -> int:
        return len(self.image)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    @property
    def device(self) -> torch.device:
        return self.image.device if torch.is_tensor(self.image) else torch.device("cpu")

    def take(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """The rows of one field as a tensor on the features' device."""
        values = getattr(self, name)
        if torch.is_tensor(values):
            return values[rows.to(values.device)]
        return torch.from_numpy(np.ascontiguousarray(values[np.sort(rows.numpy())]))[_unsort(rows)]

    def to(self, device: torch.device) -> "FrozenFeatures":
        """Every field as a tensor on device (read whole from a memory map)."""
        return replace(self, **{f.name: _tensor(getattr(self, f.name)).to(device) for f in fields(self)})


def _unsort(rows: torch.Tensor) -> torch.Tensor:
    """Where each of rows sits in sorted(rows): memory maps are read in file order, then put back in row order."""
    return torch.argsort(torch.argsort(rows, stable=True), stable=True)


def _tensor(values) -> torch.Tensor:
    return values if torch.is_tensor(values) else torch.from_numpy(np.array(values))


def cached_caption_rows(offsets: np.ndarray, per_image: int) -> np.ndarray:
    """Rows of the first `per_image` captions of each image (0: all), from caption_offsets (N_img + 1,)."""
    starts, stops = offsets[:-1], offsets[1:]
    if per_image > 0:
        stops = np.minimum(stops, starts + per_image)
    return np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]).astype(np.int64)


Allocate = Callable[[str, tuple, torch.dtype], torch.Tensor]


def in_memory(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


@torch.no_grad()
def encode_images(model, dataset, device: torch.device, autocast, allocate: Allocate = in_memory):
    """Every image of the dataset -> latents (N, Lc, h, w), tokens (N, M, C) (float32, filled chunk by chunk into
    what `allocate` gives: tensors, or the disk store's memory maps) and readable (N,) bool; an unreadable image
    (an uncached COCO folder) gets zeros and readable False."""
    side, count = model.config.model.image_size, dataset.num_images
    latents = tokens = None
    readable = allocate("readable", (count,), torch.bool)
    for start in range(0, count, ENCODE_BATCH):
        images = [dataset.image_tensor(i) for i in range(start, min(start + ENCODE_BATCH, count))]
        readable[start:start + len(images)] = torch.tensor([im is not None for im in images])
        batch = torch.stack([im if im is not None else torch.zeros(3, side, side) for im in images]).to(device)
        with autocast():
            out = model.image_encoder(batch)
        if latents is None:
            latents = allocate("latents", (count, *out["latents"].shape[1:]), torch.float32)
            tokens = allocate("tokens", (count, *out["tokens"].shape[1:]), torch.float32)
        latents[start:start + len(images)] = (out["latents"] * model.latent_scale).float().cpu()
        tokens[start:start + len(images)] = out["tokens"].float().cpu()
    return latents, tokens, readable


@torch.no_grad()
def bert_states(bert, input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device,
                autocast, allocate: Allocate = in_memory) -> torch.Tensor:
    """Token ids (N, T) -> last hidden states (N, T, H) in fp16 on the CPU, zero on padding.

    Batches go shortest first and are cut to their longest caption; padding is masked out of attention, so the
    states equal a padded forward pass (to float16 precision)."""
    lengths = attention_mask.sum(1)
    order = lengths.argsort(stable=True)
    hidden = allocate("hidden", (*input_ids.shape, bert.config.hidden_size), torch.float16)
    for start in range(0, len(order), BERT_BATCH):
        rows = order[start:start + BERT_BATCH]
        width = max(int(lengths[rows].max()), 1)
        with autocast():
            states = bert(input_ids=input_ids[rows, :width].to(device),
                          attention_mask=attention_mask[rows, :width].to(device)).last_hidden_state
        states = states * attention_mask[rows, :width, None].to(device)
        block = torch.zeros(len(rows), *hidden.shape[1:], dtype=torch.float16)
        block[:, :width] = states.to(torch.float16).cpu()
        hidden[rows] = block
    return hidden


def build_frozen_features(model, dataset, captions_per_image: int, device: torch.device, autocast,
                          allocate: Allocate = in_memory) -> FrozenFeatures:
    """The diffusion phase's inputs from the frozen model (in eval mode) and a CocoCaptions training set, written
    into what `allocate(name, shape, dtype)` gives (tensors in memory by default)."""
    was_training = model.training
    model.eval()
    try:
        latents, tokens, readable = encode_images(model, dataset, device, autocast, allocate)
        rows = cached_caption_rows(dataset.caption_offsets, captions_per_image)
        rows = rows[readable.numpy()[dataset.index.caption_image[rows]]]
        mask = torch.from_numpy(dataset.attention_mask[rows].astype(np.int64))
        width = max(int(mask.sum(1).max()), 1)    # the longest caption; the rest of max_caption_len is padding
        ids = torch.from_numpy(dataset.input_ids[rows, :width].astype(np.int64))
        mask = mask[:, :width]
        hidden = bert_states(model.text_encoder.bert, ids, mask, device, autocast, allocate)
    finally:
        model.train(was_training)
    stored_mask = allocate("mask", tuple(mask.shape), torch.int64)
    stored_mask[:] = mask
    image = allocate("image", (len(rows),), torch.int64)
    image[:] = torch.from_numpy(dataset.index.caption_image[rows].astype(np.int64))
    return FrozenFeatures(latents, tokens, readable, hidden, stored_mask, image)


def place_features(features: FrozenFeatures, device: torch.device) -> FrozenFeatures:
    """On a GPU with room for them, the features move there: a step then gathers its batch without host copies."""
    if device.type != "cuda" or features.nbytes > GPU_SHARE * torch.cuda.mem_get_info(device)[0]:
        return features
    return features.to(device)


def diffusion_phase_losses(model, features: FrozenFeatures, dataset, device: torch.device, rows: torch.Tensor | None,
                           captions: torch.Tensor | None, images: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The diffusion phase's losses on cached features, each for the modules that train (None leaves one out):
    diffusion on the cached captions `rows` (with their images' latents), the caption decoder on dataset caption
    rows `captions` (any of an image's captions: it needs token ids only), the image decoder on the latents of
    image positions `images`. Same keys as the joint phase logs."""
    f, t, out = features, model.config.train, {}
    if rows is not None:
        mask = f.take("mask", rows).to(device)
        embeds, states = model.text_encoder.heads(f.take("hidden", rows).to(device).float(), mask)
        latents = f.take("latents", f.take("image", rows).cpu()).to(device)
        out["diff"] = model.diffusion.training_loss(latents, states, mask, model.pooled_embedding(embeds))
    if captions is not None:
        picked = captions.numpy()
        ids_mask = torch.from_numpy(dataset.attention_mask[picked].astype(np.int64))
        longest = int(ids_mask.sum(1).max())
        ids = torch.from_numpy(dataset.input_ids[picked, :longest].astype(np.int64)).to(device)
        memory = f.take("tokens", torch.from_numpy(dataset.index.caption_image[picked])).to(device)
        out["cap"] = model.caption_decoder.loss(ids, ids_mask[:, :longest].to(device), memory)
    if images is not None:
        pixels = torch.stack([dataset.image_tensor(int(i)) for i in images.tolist()]).to(device)
        decoded = model.image_decoder(f.take("latents", images).to(device) / model.latent_scale)
        out["img_rec"] = F.mse_loss(decoded.float(), pixels)
    zero = torch.zeros((), device=device)
    out["rec"] = out.get("img_rec", zero) + out.get("cap", zero)
    out["loss"] = t.recon_weight * out["rec"] + t.diffusion_weight * out.get("diff", zero)
    return out
