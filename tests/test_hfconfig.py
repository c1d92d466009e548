"""HF configs follow the FFN widths a plan gives, whatever the family calls the field."""

from __future__ import annotations

import pytest
import torch

from mesimp_compress.graph import find_groups
from mesimp_compress.plan import make_plan
from mesimp_compress.surgery import apply_plan

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

IDS = {"input_ids": torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(0))}


def _families():
    t = transformers
    return {
        "distilbert": (t.DistilBertModel, t.DistilBertConfig(
            vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=48,
            max_position_embeddings=16), "hidden_dim"),
        "t5": (t.T5EncoderModel, t.T5Config(
            vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=2), "d_ff"),
        "opt": (t.OPTModel, t.OPTConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
            num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=32), "ffn_dim"),
        "llama": (t.LlamaModel, t.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16),
            "intermediate_size"),
        "gpt2": (t.GPT2Model, t.GPT2Config(  # Hugging Face's Conv1D layers
            vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_inner=48, n_positions=16,
            bos_token_id=0, eos_token_id=0), "n_inner"),
        # one FFN shared by every layer (called 3 times), and BERT's FFN run chunk by chunk
        "albert": (t.AlbertModel, t.AlbertConfig(
            vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=3,
            num_attention_heads=2, intermediate_size=48, max_position_embeddings=16),
            "intermediate_size"),
        "bert-chunked": (t.BertModel, t.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, max_position_embeddings=16, chunk_size_feed_forward=4),
            "intermediate_size"),
    }


@pytest.mark.parametrize("family", ["distilbert", "t5", "opt", "llama", "gpt2", "albert",
                                    "bert-chunked"])
def test_the_ffn_width_field_follows_and_from_pretrained_rebuilds(family, tmp_path):
    cls, config, field = _families()[family]
    torch.manual_seed(0)
    model = cls(config).eval()
    structure = find_groups(model, IDS)
    assert structure.groups, structure.skipped
    kept = {k: list(range(1, 48, 3)) for k in structure.groups}
    report = apply_plan(model, make_plan(structure, kept))
    assert getattr(model.config, field) == 16 and report.notes == []
    model.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**IDS)[0], model(**IDS)[0])


def test_a_layer_of_the_ffn_width_outside_the_ffn_does_not_set_the_field():
    """BERT's pooler has the FFN's width here: the field follows the FFN, the pooler is noted."""
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    structure = find_groups(model, IDS)
    kept = {k: list(range(16)) for k in structure.groups if "intermediate" in k}
    kept["bert.pooler.dense"] = list(range(5))
    report = apply_plan(model, make_plan(structure, kept))
    assert model.config.intermediate_size == 16
    assert report.notes == [
        "the config has no field for the width of 'bert.pooler.dense' (32 -> 5): reload with "
        "load_compressed, not from_pretrained"
    ]


def _gpt2(n_inner):
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_inner=n_inner, n_positions=16,
        bos_token_id=0, eos_token_id=0)).eval()


def test_gpt2s_default_n_inner_of_none_is_four_times_n_embd_and_follows(tmp_path):
    model = _gpt2(None)  # every released GPT-2 config says null: 4 x 32 = 128
    structure = find_groups(model, IDS)
    assert {g.width for g in structure.groups.values()} == {128}
    report = apply_plan(model, make_plan(structure, {k: list(range(0, 128, 4))
                                                     for k in structure.groups}))
    assert model.config.n_inner == 32 and report.notes == []
    model.save_pretrained(tmp_path)
    again = transformers.GPT2Model.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**IDS)[0], model(**IDS)[0])


def test_a_run_pruning_in_steps_sets_the_field_once_the_layers_meet_at_one_width(tmp_path):
    """Layers that shrink to different widths in one window and meet in a later one: the
    field follows the whole plan, not only the last step (it stayed 48 before)."""
    from mesimp_compress.config import CompressConfig
    from mesimp_compress.simplify import Simplifier

    model = _gpt2(48)
    structure = find_groups(model, IDS)
    first, second = sorted(structure.groups)
    simp = Simplifier(model, structure, CompressConfig(compensate="off"))
    simp.prune(model, {first: list(range(30)), second: list(range(36))})
    assert model.config.n_inner == 48
    assert [n for n in simp.notes() if "config.n_inner cannot represent" in n]
    simp.prune(model, {second: list(range(6, 36))})
    assert model.config.n_inner == 30 and simp.notes() == []
    model.save_pretrained(tmp_path)
    again = transformers.GPT2Model.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**IDS)[0], model(**IDS)[0])
