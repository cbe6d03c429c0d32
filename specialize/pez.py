"""PEZ discrete prompt search (Wen et al. 2023, "Hard Prompts Made Easy"): continuous token embeddings, projected
to their nearest vocabulary tokens at every step, move along the gradient taken at the projection. The objective is
the cosine between the prompt's text embedding (the adapter's own text encoder) and a target image embedding; only
the prompt embeddings get gradients, so the model's weights never change."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PezResult:
    """The best projected prompt seen; history[i] is the objective of the prompt projected at step i."""
    token_ids: list[int]
    prompt: str
    cosine: float
    history: list[float] = field(default_factory=list)


@contextmanager
def replaced_token_embeddings(embedding: torch.nn.Embedding, offset: int, prompt_embeds: torch.Tensor):
    """While active, positions offset:offset+K of the embedding's output are prompt_embeds (K, D): the text
    encoder's own forward (position embeddings, masks, EOS pooling) then runs on them unchanged."""
    def hook(module, inputs, output):                                          # output (B, T, D)
        K = prompt_embeds.shape[0]
        head, tail = output[:, :offset], output[:, offset + K:]
        middle = prompt_embeds.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([head, middle, tail], dim=1)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_prompt_embeds(adapter, token_ids: list[int], prompt_embeds: torch.Tensor) -> torch.Tensor:
    """Text embedding (1, E) of the prompt whose token embeddings are prompt_embeds (K, D); differentiable."""
    input_ids, attention_mask, offset = adapter.wrap_prompt_ids(token_ids)
    with replaced_token_embeddings(adapter.token_embedding, offset, prompt_embeds):
        return adapter.encode_token_ids(input_ids, attention_mask)


def project(prompt_embeds: torch.Tensor, vocab_embeds: torch.Tensor) -> torch.Tensor:
    """(K, D) -> indices (K,) of the nearest rows of vocab_embeds (V', D) by cosine, as the PEZ code does."""
    return (F.normalize(prompt_embeds, dim=-1) @ F.normalize(vocab_embeds, dim=-1).t()).argmax(dim=-1)


def pez_search(adapter, target_embeds: torch.Tensor, num_tokens: int = 8, steps: int = 50, lr: float = 0.1,
               weight_decay: float = 0.1, init_ids: list[int] | None = None, seed: int = 0) -> PezResult:
    """Searches num_tokens vocabulary tokens whose text embedding is closest to target_embeds (E,) or (N, E)
    (mean cosine). init_ids start the search (cut or padded with random vocabulary tokens to num_tokens)."""
    device = adapter.token_embedding.weight.device
    table = adapter.token_embedding.weight.detach()                              # (V, D)
    vocab_ids = adapter.vocabulary_ids().to(device)                               # (V',)
    vocab_embeds = table[vocab_ids]                                               # (V', D)
    target = F.normalize(target_embeds.to(device).float().reshape(-1, target_embeds.shape[-1]), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    start = list(init_ids or [])[:num_tokens]
    random_ids = vocab_ids[torch.randint(len(vocab_ids), (num_tokens - len(start),), generator=generator)]
    start_ids = torch.tensor(start, dtype=torch.long, device=device)
    prompt_embeds = torch.cat([table[start_ids], table[random_ids.to(device)]]).clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([prompt_embeds], lr=lr, weight_decay=weight_decay)
    best, history = None, []
    with torch.enable_grad():
        for step in range(steps + 1):
            ids = vocab_ids[project(prompt_embeds.detach(), vocab_embeds)].tolist()
            projected = table[ids].clone().requires_grad_(True)                     # (K, D), the hard prompt
            text_embeds = encode_prompt_embeds(adapter, ids, projected)              # (1, E)
            cosine = (F.normalize(text_embeds.float(), dim=-1) @ target.t()).mean()
            history.append(cosine.item())
            if best is None or history[-1] > best[1]:
                best = (ids, history[-1])
            if step == steps:
                break
            (grad,) = torch.autograd.grad(-cosine, projected)
            # Straight-through: the gradient at the projected tokens moves the continuous embeddings.
            prompt_embeds.grad = grad.to(prompt_embeds.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    ids, cosine = best
    prompt = adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return PezResult(ids, prompt, cosine, history)
