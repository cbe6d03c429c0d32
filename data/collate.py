"""Batching caption samples: drops the unreadable ones and reports them, since workers share no counter."""
from __future__ import annotations

import torch


def collate_captions(samples: list[dict | None]) -> dict:
    """Stacks samples from CocoCaptions into a batch.

    Returns {"images": (B, 3, H, W), "input_ids": (B, T), "attention_mask": (B, T), "image_id": (B,) long,
    "caption": list of B str, "num_skipped": int, "skipped_ids": image ids of the unreadable samples}. B counts the
    readable samples only; when none is readable, B is 0 (the tensors are empty) and the loop should skip the batch
    after noting the skipped ids. A None sample counts as unreadable with no id.
    """
    kept = [s for s in samples if s is not None and "images" in s]
    skipped_ids = [s["unreadable"] for s in samples if s is not None and "unreadable" in s]
    num_skipped = len(samples) - len(kept)
    if not kept:
        return {"images": torch.empty(0, 3, 0, 0), "input_ids": torch.empty(0, 0, dtype=torch.long),
                "attention_mask": torch.empty(0, 0, dtype=torch.long), "image_id": torch.empty(0, dtype=torch.long),
                "caption": [], "num_skipped": num_skipped, "skipped_ids": skipped_ids}
    return {
        "images": torch.stack([s["images"] for s in kept]),
        "input_ids": torch.stack([s["input_ids"] for s in kept]),
        "attention_mask": torch.stack([s["attention_mask"] for s in kept]),
        "image_id": torch.tensor([s["image_id"] for s in kept], dtype=torch.long),
        "caption": [s["caption"] for s in kept],
        "num_skipped": num_skipped,
        "skipped_ids": skipped_ids,
    }


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on device (non-blocking: the loader pins memory on CUDA); the rest as it is."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
