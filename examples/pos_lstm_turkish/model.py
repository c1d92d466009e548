"""BiLSTM part-of-speech tagger for the Turkish Web Treebank (the paper's POS setting).

Word ids (B, T), padded with 0 at the end, go through an Embedding, a bidirectional LSTM of
500 hidden units per direction and a Linear to the UPOS tag set, giving logits (B, T, tags).
The forward pass is plain and padded (no packed sequences, so it exports to ONNX); padding
positions carry target -100 and count nowhere in the loss. The reverse direction reads a
sentence's trailing padding before the sentence, so a sentence's tags can shift slightly with
the padding of its batch; the eval split is always batched the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from mesimp_compress.datasets import PAD_ID, upos_corpus

EMBEDDING = 128
HIDDEN = 500


class Tagger(nn.Module):
    """Embedding -> BiLSTM -> Linear over a padded batch of word ids."""

    def __init__(self, words: int, tags: int, embedding: int = EMBEDDING, hidden: int = HIDDEN,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.embed = nn.Embedding(words, embedding, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Tag logits (B, T, tags) for word ids (B, T)."""
        states, _ = self.lstm(self.dropout(self.embed(ids)))
        return self.out(self.dropout(states))


def build() -> nn.Module:
    """A freshly initialised tagger sized to the treebank's vocabulary and tag set."""
    corpus = upos_corpus()
    return Tagger(len(corpus.words), len(corpus.tags))
