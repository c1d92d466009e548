import contextlib
import importlib.util
import io
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mesimp_compress.datasets import PAD_ID, upos_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(example: str, name: str):
    path = EXAMPLES / example / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"test_{example}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _widths(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_mlp_is_784_500_500_10():
    torch.manual_seed(0)
    model = _load("mlp_animal_mnist", "model").build()
    assert _widths(model) == [(784, 500), (500, 500), (500, 10)]
    assert model(torch.randn(3, 784)).shape == (3, 10)


def test_mlp_train_with_zero_epochs_saves_a_state_dict_that_loads(tmp_path):
    # no training: checks the saving path and that accuracy is measured on the real eval split
    trainer = _load("mlp_animal_mnist", "train_baseline")
    out = tmp_path / "sub" / "baseline.pt"
    metrics = trainer.train(out, epochs=0, seed=0)
    assert metrics["epochs"] == 0 and 0.0 <= metrics["eval_accuracy"] <= 30.0  # chance is ~10%
    model = _load("mlp_animal_mnist", "model").build()
    model.load_state_dict(torch.load(out, weights_only=True))
    torch.manual_seed(0)
    reference = _load("mlp_animal_mnist", "model").build()
    assert torch.equal(model[0].weight, reference[0].weight)  # seeded: same init as train(seed=0)
    assert not (tmp_path / "sub" / "baseline.pt.partial").exists()


def test_cnn_shapes_through_conv_bn_flatten_linear():
    torch.manual_seed(0)
    model = _load("cnn", "model").build().eval()
    convs = [(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(1, 32), (32, 64)]
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == [32, 64]
    assert _widths(model) == [(64 * 7 * 7, 128), (128, 10)]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_pos_tagger_sized_to_the_treebank_and_tags_every_position():
    corpus = upos_corpus()
    torch.manual_seed(0)
    model = _load("pos_lstm_turkish", "model").build().eval()
    assert model.embed.num_embeddings == len(corpus.words) and model.embed.padding_idx == PAD_ID
    lstm = model.lstm
    assert (lstm.hidden_size, lstm.bidirectional, lstm.batch_first) == (500, True, True)
    assert _widths(model) == [(1000, 14)]
    ids = corpus.eval[0][:3, :12]
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (3, 12, 14)
        # trailing padding leaves the forward direction's states of the real words unchanged
        length = int((ids[0] != PAD_ID).sum())
        padded = torch.cat([ids[:1, :length], torch.zeros(1, 9, dtype=torch.int64)], dim=1)
        short, _ = model.lstm(model.embed(ids[:1, :length]))
        long, _ = model.lstm(model.embed(padded))
    assert torch.allclose(short[..., :500], long[:, :length, :500], atol=1e-6)
    assert float(model.embed.weight.detach()[PAD_ID].abs().sum()) == 0.0


def test_pos_tagger_exports_to_onnx_with_dynamic_batch_and_length(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tagger_class = _load("pos_lstm_turkish", "model").Tagger
    tagger = tagger_class(words=40, tags=5, embedding=8, hidden=12).eval()
    ids = torch.randint(1, 40, (3, 7))
    ids[1, 4:] = PAD_ID
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(tagger, (ids,), dynamo=True, dynamic_shapes=(dims,),
                                    input_names=["ids"], external_data=False)
    path = tmp_path / "tagger.onnx"
    program.save(str(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    other = torch.randint(1, 40, (5, 11))
    other[2, 3:] = PAD_ID
    for x in (ids, other):
        (got,) = session.run(None, {"ids": x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(got), tagger(x), atol=1e-5)


def test_minilm_matches_sentence_transformers_and_ignores_padding():
    pytest.importorskip("transformers")
    from mesimp_compress.datasets import minilm_dir, tokenize_sentences

    model = _load("minilm", "model").build()
    sentences = ["the market fell sharply", "a cat sat on the mat near the door of the house"]
    ((ids, mask),) = tokenize_sentences(sentences, batch_size=2)
    with torch.no_grad():
        embeddings = model(ids, mask)
        alone = model(ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
    assert embeddings.shape == (2, 384)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(alone[0], embeddings[0], atol=1e-5)  # padding changes nothing
    from mesimp_compress.config import CompressConfig
    from mesimp_compress.features import captured, matched_layers

    recipe = CompressConfig.from_toml(EXAMPLES / "minilm" / "recipe.toml")
    blocks = matched_layers(model, recipe.distill_layers)  # the recipe's layer distillation
    assert blocks == [f"encoder.encoder.layer.{i}" for i in range(6)]
    with captured(model, blocks) as states, torch.no_grad():
        model(ids, mask)
    assert all(states[b].shape == (2, ids.shape[1], 384) for b in blocks)
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True)
    assert torch.allclose(embeddings, expected, atol=1e-5)
