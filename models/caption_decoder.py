"""Transformer caption decoder over a reduced vocabulary, cross-attending to image tokens, with a KV cache.

The output layer covers only the tokenizer ids the training captions use (mapped back to tokenizer ids on the
way out): a full 30,522-way output cost more than the whole BERT per batch on 2 CPU cores.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.schema import ModelConfig
from models.image_encoder import TOKEN_GRID

MEMORY_TOKENS = TOKEN_GRID * TOKEN_GRID   # image tokens the decoder reads

# Per layer: (self_k, self_v, cross_k, cross_v), each (B, heads, T or M, head_dim).
LayerCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.heads, C // self.heads).transpose(1, 2)    # (B, h, T, C/h)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(self, x, k, v, causal: bool) -> torch.Tensor:
        T, S = x.shape[1], k.shape[2]
        mask = None
        if causal and S != T:  # new tokens after a cache: each sees the whole cache and the new ones before it
            mask, causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T), False
        y = F.scaled_dot_product_attention(self.split(self.q(x)), k, v, attn_mask=mask, is_causal=causal)
        return self.out(y.transpose(1, 2).flatten(2))                        # (B, T, C)


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the image tokens, MLP."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.cross_attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: LayerCache | None = None):
        """x (B, T, C) new positions; with a cache, T new tokens attend to every earlier one."""
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cross_k, cross_v = cache[2], cache[3]
        else:
            cross_k, cross_v = self.cross_attn.keys_values(memory)
        # Causal masking is only needed when several new tokens arrive at once (training, or a prompt prefix).
        x = x + self.drop(self.self_attn(h, k, v, causal=x.shape[1] > 1))
        x = x + self.drop(self.cross_attn(self.norm2(x), cross_k, cross_v, causal=False))
        x = x + self.drop(self.mlp(self.norm3(x)))
        return x, (k, v, cross_k, cross_v)


class CaptionDecoder(nn.Module):
    """Teacher-forced logits in training; `step` decodes with a KV cache (the strategies: models/caption_search.py).
    Vocabulary indices, not tokenizer ids, inside; `to_vocab`/`to_token_ids` convert at the boundary."""

    def __init__(self, cfg: ModelConfig, memory_dim: int, tokenizer_vocab_size: int, bos_id: int, eos_id: int,
                 pad_id: int, unk_id: int):
        super().__init__()
        vocab_size = cfg.caption_vocab_size or tokenizer_vocab_size
        width = cfg.caption_decoder_width
        self.max_len = cfg.max_caption_len
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.register_buffer("vocab_ids", torch.arange(vocab_size))          # vocab index -> tokenizer id
        self.register_buffer("vocab_index", torch.arange(tokenizer_vocab_size).clamp(max=vocab_size - 1))
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_caption_len, width))
        self.memory_proj = nn.Linear(memory_dim, width)
        # Where each image token sits in the grid: cross-attention is blind to order, and without this the decoder
        # cannot tell the left object from the right one (relation words at chance). Zero at start: training
        # moves it, and a checkpoint written before it existed loads as zeros, unchanged.
        self.memory_pos = nn.Parameter(torch.zeros(MEMORY_TOKENS, width))
        self.layers = nn.ModuleList(DecoderLayer(width, cfg.caption_decoder_heads, cfg.dropout)
                                    for _ in range(cfg.caption_decoder_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        nn.init.normal_(self.pos_embed, std=0.02)

    @torch.no_grad()
    def set_vocabulary(self, token_ids: list[int]) -> None:
        """Uses these tokenizer ids (the training captions' ids plus the special ids) as the output vocabulary."""
        ids = torch.tensor(sorted(set(token_ids)), device=self.vocab_ids.device)
        assert len(ids) == len(self.vocab_ids), "caption_vocab_size must be set to the vocabulary's size"
        self.vocab_ids.copy_(ids)
        unk = int((ids == self.unk_id).nonzero()[0]) if (ids == self.unk_id).any() else 0
        self.vocab_index.fill_(unk)
        self.vocab_index[ids] = torch.arange(len(ids), device=ids.device)

    def to_vocab(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.vocab_index[token_ids]

    def to_token_ids(self, vocab: torch.Tensor) -> torch.Tensor:
        return self.vocab_ids[vocab]

    def memory(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.memory_proj(image_tokens) + self.memory_pos[: image_tokens.shape[1]]  # (B, M, C)

    def forward(self, vocab: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """vocab (B, T) indices, memory (B, M, C) -> logits (B, T, V)."""
        x = self.token_embed(vocab) + self.pos_embed[: vocab.shape[1]]
        for layer in self.layers:
            x, _ = layer(x, memory)
        return self.head(self.norm(x))

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token cross-entropy over the non-pad positions."""
        vocab = self.to_vocab(input_ids)
        logits = self(vocab[:, :-1], self.memory(image_tokens))             # (B, T-1, V)
        targets = vocab[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def step(self, vocab: torch.Tensor, memory: torch.Tensor, cache: list[LayerCache] | None, position: int):
        """Decodes new positions vocab (B, t) starting at `position`; returns logits of the last (B, V) and the cache."""
        x = self.token_embed(vocab) + self.pos_embed[position: position + vocab.shape[1]]
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, memory, cache[i] if cache else None)
            new_cache.append(layer_cache)
        return self.head(self.norm(x[:, -1])), new_cache

    @staticmethod
    def reorder_cache(cache: list[LayerCache], beam_index: torch.Tensor) -> list[LayerCache]:
        return [tuple(t.index_select(0, beam_index) for t in layer) for layer in cache]
