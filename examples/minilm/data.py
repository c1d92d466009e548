"""Unlabeled Penn Treebank sentences for compressing MiniLM by distillation.

``load()`` returns (train, eval) lists of ``((input_ids, attention_mask), targets)`` batches
where the targets are the pretrained model's own embeddings of the batch, computed once at
load time: the compressed encoder is trained and scored on how closely it reproduces them.
Use it with this file's ``loss`` (1 - cosine similarity) and ``metric`` (mean cosine).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from mesimp_compress.datasets import minilm_tokenizer, ptb_sentences, tokenize_sentences

HERE = Path(__file__).resolve().parent
TRAIN_SENTENCES = 8192
EVAL_SENTENCES = 256
MAX_LENGTH = 64

Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def _build() -> nn.Module:
    spec = importlib.util.spec_from_file_location(f"{HERE.name}_model", HERE / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


@torch.no_grad()
def _with_targets(model: nn.Module,
                  batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Batch]:
    return [((ids, mask), model(ids, mask)) for ids, mask in batches]


def load(batch_size: int = 32, train_sentences: int = TRAIN_SENTENCES,
         eval_sentences: int = EVAL_SENTENCES, seed: int = 0) -> tuple[list[Batch], list[Batch]]:
    """(train, eval) batches of tokenised PTB sentences with the pretrained embeddings as targets.

    Sentences are grouped by length (little padding); the train batches' order is shuffled
    once with ``seed``."""
    train_text, eval_text = ptb_sentences(train_sentences, eval_sentences)
    tokenizer = minilm_tokenizer()
    model = _build()
    parts = []
    for text in (train_text, eval_text):
        text = sorted(text, key=lambda s: (len(tokenizer.tokenize(s)), s))
        batches = tokenize_sentences(text, batch_size, MAX_LENGTH, tokenizer)
        parts.append(_with_targets(model, batches))
    order = torch.randperm(len(parts[0]), generator=torch.Generator().manual_seed(seed)).tolist()
    return [parts[0][i] for i in order], parts[1]


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cosine similarity between the model's and the original embeddings."""
    return (1.0 - nn.functional.cosine_similarity(outputs, targets, dim=-1)).mean()


@torch.no_grad()
def metric(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(sum of cosine similarities to the original embeddings, number of sentences)."""
    cos = nn.functional.cosine_similarity(outputs, targets, dim=-1)
    return float(cos.sum()), float(cos.numel())
