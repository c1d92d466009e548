"""`make demo`: train the dense baseline if it is missing, then run `mesimp compress` on it.

    python examples/mlp_animal_mnist/demo.py [--out runs/demo] [extra mesimp compress flags]

Everything runs offline on CPU in a minute or two with the default settings: the baseline
(784-500-500-10 MLP on Animal-MNIST), then meProp fine-tuning (k = 25% of each layer's
width, the rule applied after every 1/8 epoch, a pruning cycle, a normal cycle and recovery
epochs, distilling from the original), the ONNX export of both models, the parity check and
the latency table in onnxruntime.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BASELINE = HERE / "baseline.pt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    args, extra = parser.parse_known_args()
    if not BASELINE.exists():
        sys.path.insert(0, str(HERE))
        from train_baseline import train

        print(f"training the dense baseline (8 epochs) -> {BASELINE.relative_to(ROOT)}")
        metrics = train(BASELINE, log=print)
        print(f"baseline eval accuracy {metrics['eval_accuracy']:.2f}%")
    command = [
        sys.executable, "-m", "mesimp_compress.cli", "compress",
        f"{HERE / 'model.py'}:build", "--weights", str(BASELINE),
        "--data", "animal-mnist", "--out", str(args.out), "--force", *extra,
    ]
    print("$ mesimp " + " ".join(command[3:]))
    return subprocess.call(command, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
