"""A tiny GPT-2 language model (Hugging Face Conv1D layers) compressed end to end."""

from __future__ import annotations

import json

import pytest
import torch

import mesimp_compress as mc

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


class _LM(torch.nn.Module):
    """GPT2LMHeadModel returning its logits (the default loss and metric read a tensor)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2,
                                         n_inner=64, n_positions=16, bos_token_id=0,
                                         eos_token_id=0)
        self.gpt = transformers.GPT2LMHeadModel(config)

    def forward(self, ids):
        return self.gpt(input_ids=ids).logits


def _counting(batches: int, seed: int) -> list:
    """Sequences that count up modulo 40: the next token is always the current one + 1."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        ids = (torch.randint(0, 40, (16, 1), generator=g) + torch.arange(12)) % 40
        data.append((ids, (ids + 1) % 40))
    return data


def test_gpt2_ffn_units_are_pruned_with_row_sparse_per_example_meprop(tmp_path):
    config = {"k": 16, "mode": "per_example", "sparse_update": True, "window": 0.25,
              "epochs": 2, "recovery_epochs": 0, "lr": 3e-3, "threads": 1, "batches": [1, 4],
              "quantize": False, "seed": 3}
    result = mc.compress(_LM(), _counting(32, 1), _counting(4, 2), config=config,
                         out=tmp_path / "out")
    ffn = [f"gpt.transformer.h.{i}.mlp.c_fc" for i in range(2)]
    assert set(result.widths) == set(ffn) and all(result.widths[k] < 64 for k in ffn)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "ok" and report["metrics"]["ort_after"] > 0.9
    layers = {layer["name"]: layer for layer in report["layers"]}
    for key in ffn:
        width = result.widths[key]
        assert layers[key]["width_after"] == width
        assert layers[key]["params_after"] == 33 * width  # weight (32, width) and bias
        proj = layers[key.replace("c_fc", "c_proj")]
        assert proj["params_after"] == width * 32 + 32 and proj["size_status"] == "match"
    ids = _counting(1, 3)[0][0]
    rebuilt = mc.load(_LM(), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), result.model.eval()(ids))
