"""Turkish UPOS tagging from the Turkish Web Treebank (CoNLL-U), as padded id tensors.

A sentence is a row of word ids padded with :data:`PAD_ID` at the end, its tags a row of
tag ids padded with -100 (``tasks.IGNORE_INDEX``), so inputs stay one tensor and padding counts
nowhere in the loss or the accuracy. A sentence's length is ``(ids != PAD_ID).sum(-1)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..errors import DataError
from ..tasks import IGNORE_INDEX
from ._batching import check_batch_size
from ._locate import data_file, package_dir

Pair = tuple[torch.Tensor, torch.Tensor]

PAD_ID = 0
UNK_ID = 1
MIN_COUNT = 2
"""A word needs this many occurrences in the train split to get its own id; rarer words
read as ``<unk>``, so the ``<unk>`` embedding is trained on real words."""
SECTIONS = ("web", "wiki")
BUCKET = 16
"""Training batches are drawn from chunks of ``BUCKET * batch_size`` shuffled sentences,
sorted by length, so a batch holds sentences of similar length and little padding."""


def _in_train(index: int) -> bool:
    # The treebank package's own convention, per file: 8 of every 10 sentences are train,
    # the 9th dev and the 10th test. Here dev and test together are the eval split.
    return index % 10 < 8


def _read_conllu(path: Path) -> list[list[tuple[str, str]]]:
    sentences: list[list[tuple[str, str]]] = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        tokens = []
        for line in block.strip().splitlines():
            if not line or line.startswith("#"):
                continue
            columns = line.split("\t")
            if len(columns) != 10:
                raise DataError(f"{path.name}: a token line must have 10 tab-separated columns, "
                                f"got {len(columns)}: {line[:60]!r}")
            if "-" in columns[0] or "." in columns[0]:  # multiword ranges and empty nodes
                continue
            tokens.append((columns[1], columns[3]))
        if tokens:
            sentences.append(tokens)
    return sentences


@dataclass(frozen=True)
class UposCorpus:
    """The whole tagging set: vocabulary, tag set, and padded (ids, tags) per split."""

    words: tuple[str, ...]
    """Word of each id: ``words[PAD_ID] == "<pad>"``, ``words[UNK_ID] == "<unk>"``."""
    tags: tuple[str, ...]
    """UPOS tag of each tag id (sorted)."""
    train: Pair
    """int64 (N, T) word ids and int64 (N, T) tag ids, padded to the longest sentence."""
    eval: Pair
    word_id: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "word_id", {w: i for i, w in enumerate(self.words)})

    def encode(self, tokens: Sequence[str]) -> torch.Tensor:
        """Word ids (int64, (len(tokens),)) of a tokenised sentence; unknown words read as <unk>."""
        ids = [self.word_id.get(t.lower(), UNK_ID) for t in tokens]
        return torch.tensor(ids, dtype=torch.int64)


def _pad(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


@lru_cache(maxsize=1)
def upos_corpus() -> UposCorpus:
    """Read both treebank sections once: vocabulary from the train split only, tags from all."""
    root = package_dir("turkish_treebanks", "turkish-treebanks").parent / "data"
    train: list[list[tuple[str, str]]] = []
    evaluation: list[list[tuple[str, str]]] = []
    for section in SECTIONS:
        path = data_file(root / f"{section}.conllu", "turkish-treebanks")
        for index, sentence in enumerate(_read_conllu(path)):
            (train if _in_train(index) else evaluation).append(sentence)
    counts = Counter(form.lower() for sentence in train for form, _ in sentence)
    words = ("<pad>", "<unk>", *sorted(w for w, c in counts.items() if c >= MIN_COUNT))
    tags = tuple(sorted({tag for part in (train, evaluation) for s in part for _, tag in s}))
    word_id = {w: i for i, w in enumerate(words)}
    tag_id = {t: i for i, t in enumerate(tags)}
    width = max(len(s) for part in (train, evaluation) for s in part)

    def tensors(part: list[list[tuple[str, str]]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[word_id.get(form.lower(), UNK_ID) for form, _ in s] for s in part]
        labels = [[tag_id[tag] for _, tag in s] for s in part]
        return _pad(ids, width, PAD_ID), _pad(labels, width, IGNORE_INDEX)

    return UposCorpus(words=words, tags=tags, train=tensors(train), eval=tensors(evaluation))


class LengthBatches(Sampler[list[int]]):
    """Batches of sentence indices. With a generator: shuffled, each batch drawn from a sorted
    bucket (see :data:`BUCKET`); without: all sentences sorted by length, a fixed order."""

    def __init__(self, lengths: torch.Tensor, batch_size: int,
                 generator: torch.Generator | None = None) -> None:
        self.lengths = lengths
        self.batch_size = check_batch_size(batch_size)
        self.generator = generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.generator is None:
            order = torch.argsort(self.lengths, stable=True)
            yield from (c.tolist() for c in order.split(self.batch_size))
            return
        perm = torch.randperm(len(self.lengths), generator=self.generator)
        batches: list[torch.Tensor] = []
        for chunk in perm.split(self.batch_size * BUCKET):
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches.extend(chunk.split(self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i].tolist()


def trim_padding(batch: list[Pair]) -> Pair:
    """Stack (ids, tags) rows and cut the columns that are padding in every row."""
    ids = torch.stack([row[0] for row in batch])
    tags = torch.stack([row[1] for row in batch])
    width = max(int((ids != PAD_ID).sum(-1).max()), 1)
    return ids[:, :width], tags[:, :width]


def turkish_upos(batch_size: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Turkish UPOS: (train, eval) batches of (int64 word ids (B, T), int64 tag ids (B, T)),
    T the longest sentence of the batch; ids padded with 0, tags with -100."""
    corpus = upos_corpus()
    loaders = []
    for (ids, tags), generator in ((corpus.train, torch.Generator().manual_seed(seed)),
                                   (corpus.eval, None)):
        sampler = LengthBatches((ids != PAD_ID).sum(-1), batch_size, generator)
        loaders.append(DataLoader(TensorDataset(ids, tags), batch_sampler=sampler,
                                  collate_fn=trim_padding))
    return loaders[0], loaders[1]
