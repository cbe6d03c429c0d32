"""Full-split image<->text retrieval: Recall@K and median rank under the COCO 5k protocol (Karpathy & Fei-Fei;
VSE++): an image -> text hit is any of the image's captions; text -> image ranks the caption's own image."""
from __future__ import annotations

import torch

RECALL_AT = (1, 5, 10)
_CHUNK = 1024  # queries per similarity block: a 5k x 25k matrix at once would be 500 MB


def _check(image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_image: torch.Tensor) -> None:
    assert image_embeds.ndim == text_embeds.ndim == 2 and image_embeds.shape[1] == text_embeds.shape[1]
    assert caption_image.shape == (len(text_embeds),), "caption_image needs one image index per caption"
    assert len(caption_image) == 0 or int(caption_image.max()) < len(image_embeds)


def image_to_text_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                        caption_image: torch.Tensor) -> torch.Tensor:
    """image_embeds (N_img, E), text_embeds (N_cap, E) normalised, caption_image (N_cap,) long -> ranks (N_img,).

    Rank 0 is a hit at R@1. The rank of an image is that of its best-scoring own caption, counted
    pessimistically: every other image's caption scoring >= it is ahead, so collapsed (constant) embeddings score
    chance or worse, never a perfect recall.
    """
    _check(image_embeds, text_embeds, caption_image)
    ranks = []
    for start in range(0, len(image_embeds), _CHUNK):
        sims = image_embeds[start:start + _CHUNK].float() @ text_embeds.float().t()       # (b, N_cap)
        rows = torch.arange(start, start + len(sims), device=sims.device)
        own = caption_image[None, :].to(sims.device) == rows[:, None]                     # (b, N_cap)
        best_own = sims.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)         # (b, 1)
        ranks.append(((sims >= best_own) & ~own).sum(dim=1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def text_to_image_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                        caption_image: torch.Tensor) -> torch.Tensor:
    """-> ranks (N_cap,) of each caption's own image among all images (0 = R@1 hit; ties count against it)."""
    _check(image_embeds, text_embeds, caption_image)
    ranks = []
    for start in range(0, len(text_embeds), _CHUNK):
        sims = text_embeds[start:start + _CHUNK].float() @ image_embeds.float().t()       # (b, N_img)
        own_score = sims.gather(1, caption_image[start:start + len(sims), None].to(sims.device))  # (b, 1)
        ranks.append((sims >= own_score).sum(dim=1) - 1)  # - 1: the own image is >= itself
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def summarize_ranks(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    """ranks (N,) 0-based -> {prefix_r1, prefix_r5, prefix_r10 (fractions), prefix_median_rank (1-based)}."""
    ranks = ranks.float()
    out = {f"{prefix}_r{k}": float((ranks < k).float().mean()) for k in RECALL_AT}
    # floor(median) + 1, as VSE++/SCAN's evaluation code computes it.
    out[f"{prefix}_median_rank"] = float(ranks.quantile(0.5).floor()) + 1.0 if len(ranks) else float("nan")
    return out


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                      caption_image: torch.Tensor) -> dict[str, float]:
    """Normalised embeds -> i2t_* and t2i_* recalls and median ranks over the whole split, plus its sizes."""
    return {**summarize_ranks(image_to_text_ranks(image_embeds, text_embeds, caption_image), "i2t"),
            **summarize_ranks(text_to_image_ranks(image_embeds, text_embeds, caption_image), "t2i"),
            "num_images": len(image_embeds), "num_captions": len(text_embeds)}


def top_matches(query_embeds: torch.Tensor, candidate_embeds: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, E), (N, E) -> indices (Q, min(k, N)) of the best candidates per query, best first."""
    sims = query_embeds.float() @ candidate_embeds.float().t()                            # (Q, N)
    return sims.topk(min(k, sims.shape[1]), dim=1).indices
