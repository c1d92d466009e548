"""ONNX proof of the speedup: original vs compressed vs a freshly built dense reference in ORT.

Two cases, each measured in one run with the library's interleaved benchmark
(:func:`mesimp_compress.latency.benchmark`: same session options, warm-up, models rotated
round by round, every call timed):

- **MLP** 784-500-500-10 and its compressed form with hidden widths 50/50 (the kept rows and
  columns copied from the original, as surgery does), plus a freshly built 784-50-50-10.
- **all-MiniLM-L6-v2** (sentence encoder: BERT + mean pooling + L2 norm) and the same model
  with every FFN cut from 1536 to 384 units (the 384 ``intermediate.dense`` rows of largest
  norm and the matching ``output.dense`` columns), plus a fresh BERT built with
  ``intermediate_size=384``; sequence length 128.

Before timing, every compressed file is checked: ORT parity with PyTorch, and the size check
against the original file (per layer and in total). ``--int8`` adds the dynamic int8
quantisation of the compressed model as a fourth column. Prints Markdown tables.

    .venv/bin/python bench/bench_onnx.py [--case mlp|minilm|all] [--threads 1,2] [--int8]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mesimp_compress.export import check_shrunk, export_onnx
from mesimp_compress.latency import LatencyResult, benchmark
from mesimp_compress.quantize import INT8_ATOL, INT8_RTOL, quantize_int8
from mesimp_compress.report import machine, versions
from mesimp_compress.verify import check_parity

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------- MLP
def mlp(hidden: tuple[int, int] = (500, 500)) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, hidden[0]),
        nn.ReLU(),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], 10),
    )


def shrink_mlp(original: nn.Sequential, widths: tuple[int, int]) -> nn.Sequential:
    """Keep the rows of largest L2 norm in each hidden layer and the matching columns after."""
    keep1 = original[0].weight.norm(dim=1).topk(widths[0]).indices.sort().values
    keep2 = original[2].weight[:, keep1].norm(dim=1).topk(widths[1]).indices.sort().values
    small = mlp(widths)
    with torch.no_grad():
        small[0].weight.copy_(original[0].weight[keep1])
        small[0].bias.copy_(original[0].bias[keep1])
        small[2].weight.copy_(original[2].weight[keep2][:, keep1])
        small[2].bias.copy_(original[2].bias[keep2])
        small[4].weight.copy_(original[4].weight[:, keep2])
        small[4].bias.copy_(original[4].bias)
    return small.eval()


def mlp_case(folder: Path, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    original = mlp().eval()
    weights = REPO / "examples" / "mlp_animal_mnist" / "baseline.pt"
    if weights.is_file():
        original.load_state_dict(torch.load(weights, weights_only=True))
    compressed = shrink_mlp(original, (50, 50))
    reference = mlp((50, 50)).eval()  # freshly built, random weights: only its shapes matter
    example = (torch.randn(2, 784),)
    models = {"original": original, "compressed": compressed, "reference": reference}
    return run_case(
        "MLP 784-500-500-10 -> 784-50-50-10",
        folder / "mlp",
        models,
        example,
        None,
        args.batches_mlp,
        None,
        args,
    )


# ---------------------------------------------------------------------- MiniLM
def minilm_models() -> dict[str, nn.Module]:
    sys.path.insert(0, str(REPO / "examples" / "minilm"))
    from model import SentenceEncoder, build  # examples/minilm/model.py
    from transformers import AutoModel

    original = build().eval()
    compressed = copy.deepcopy(original)
    for layer in compressed.encoder.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        keep = up.weight.norm(dim=1).topk(384).indices.sort().values
        new_up, new_down = nn.Linear(up.in_features, 384), nn.Linear(384, down.out_features)
        with torch.no_grad():
            new_up.weight.copy_(up.weight[keep])
            new_up.bias.copy_(up.bias[keep])
            new_down.weight.copy_(down.weight[:, keep])
            new_down.bias.copy_(down.bias)
        layer.intermediate.dense, layer.output.dense = new_up, new_down
    compressed.encoder.config.intermediate_size = 384
    config = copy.deepcopy(original.encoder.config)
    config.intermediate_size = 384
    torch.manual_seed(0)
    reference = SentenceEncoder(AutoModel.from_config(config)).eval()
    return {"original": original, "compressed": compressed.eval(), "reference": reference}


def minilm_case(folder: Path, args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    models = minilm_models()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (2, args.seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    example = (ids, torch.ones_like(ids))
    return run_case(
        f"all-MiniLM-L6-v2, FFN 1536 -> 384, seq {args.seq}",
        folder / "minilm",
        models,
        example,
        None,
        args.batches_minilm,
        args.seq,
        args,
    )


# ---------------------------------------------------------------------- one case
def run_case(
    title: str,
    folder: Path,
    models: dict[str, nn.Module],
    example: tuple,
    axes: list | None,
    batches: list[int],
    seq: int | None,
    args: argparse.Namespace,
) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files, started = {}, time.perf_counter()
    for label, model in models.items():
        files[label] = export_onnx(model, example, folder / f"{label}.onnx", dynamic_axes=axes)
    exported = time.perf_counter() - started
    sizes = check_shrunk(
        files["compressed"].path,
        models["compressed"],
        original_onnx=files["original"].path,
        original_model=models["original"],
    )
    checks = [example, tuple(x[:1] for x in example)]
    parity = {
        label: check_parity(
            files[label].path,
            models[label],
            checks,
            label=label,
            input_names=files[label].input_names,
        )
        .outputs[0]
        .max_abs
        for label in ("original", "compressed")
    }
    paths = {label: r.path for label, r in files.items()}
    if args.int8:
        paths["int8"] = quantize_int8(paths["compressed"], folder / "int8.onnx")
        parity["int8"] = (
            check_parity(
                paths["int8"],
                models["compressed"],
                checks,
                label="int8",
                atol=INT8_ATOL,
                rtol=INT8_RTOL,
                input_names=files["compressed"].input_names,
                raise_on_fail=False,
            )
            .outputs[0]
            .max_abs
        )
    result = benchmark(
        paths,
        example,
        batches=batches,
        seq=seq,
        threads=args.threads,
        warmup=args.warmup,
        rounds=args.rounds,
        block=args.block,
        max_seconds=args.max_seconds,
        axes=axes,
        input_names=files["original"].input_names,
    )
    total_before = sum(s.onnx_params_before or 0 for s in sizes)
    total_after = sum(s.onnx_params for s in sizes)
    print_case(
        title,
        result,
        parity,
        total_before,
        total_after,
        exported,
        {label: r.exporter for label, r in files.items()},
    )
    return {
        "title": title,
        "latency": result.to_dict(),
        "parity_max_abs": parity,
        "onnx_params": {"before": total_before, "after": total_after},
        "exporters": {label: r.exporter for label, r in files.items()},
    }


def print_case(
    title: str,
    result: LatencyResult,
    parity: dict,
    before: int,
    after: int,
    exported: float,
    exporters: dict,
) -> None:
    print(f"\n### {title}\n")
    print(
        f"exporters {exporters} ({exported:.1f} s); ONNX weights {before:,} -> {after:,} "
        f"({before / after:.2f}x fewer); parity max abs: "
        + ", ".join(f"{k} {v:.2g}" for k, v in parity.items())
    )
    labels = result.labels
    head = ["threads", "batch"] + [f"{lb} ms (median / p90)" for lb in labels]
    head += ["speedup (p10-p90)", "compressed / reference"]
    if "int8" in labels:
        head.append("int8 speedup")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for row in result.rows:
        t = row.timings
        cells = [str(row.threads), str(row.batch)]
        cells += [f"{t[lb].median_ms:.3f} / {t[lb].p90_ms:.3f}" for lb in labels]
        s = row.speedups["compressed"]
        cells.append(f"{s.value:.2f}x ({s.low:.2f}-{s.high:.2f})")
        cells.append(f"{t['compressed'].median_ms / t['reference'].median_ms:.3f}")
        if "int8" in labels:
            cells.append(f"{row.speedups['int8'].value:.2f}x")
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


REPO = HERE.parent


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("mlp", "minilm", "all"), default="all")
    parser.add_argument("--threads", type=_ints, default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--batches-mlp", type=_ints, default=[1, 8, 64])
    parser.add_argument("--batches-minilm", type=_ints, default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="keep the ONNX files in this folder")
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads))
    env = {"versions": versions(), "machine": machine(args.threads)}
    print(
        f"torch {env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime']}, "
        f"{env['machine']['cpu']} ({env['machine']['cpu_count']} cores); threads {args.threads}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        results = []
        if args.case in ("mlp", "all"):
            results.append(mlp_case(folder, args))
        if args.case in ("minilm", "all"):
            results.append(minilm_case(folder, args))
    if args.json:
        args.json.write_text(json.dumps({**env, "cases": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
