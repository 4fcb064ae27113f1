#!/usr/bin/env python3
"""Re-score the MNIST test set with an exported MLP, with safetensors and NumPy only.

    pip install safetensors numpy
    python3 examples/python/score_mnist.py runs/<run>/export [data/mnist]

The export folder is what `ps-cluster export` writes (model.safetensors and
card.json; docs/EXPORT.md describes both). The test set is read from the
project's data/mnist (IDX files, gzipped or not) unless another folder is given.
"""

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes: big-endian magic 0x000008DD (DD dimensions), the dimensions, the bytes."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(folder: Path, name: str) -> Path:
    gz = folder / f"{name}.gz"
    return gz if gz.exists() else folder / name


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    export = Path(sys.argv[1])
    data = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).resolve().parents[2] / "data" / "mnist"

    tensors = load_file(str(export / "model.safetensors"))
    card = json.loads((export / "card.json").read_text())
    layers = card["architecture"]["layers"]

    # The preprocessing of the card: 784 pixels row by row, byte / 255.
    x = read_idx(find(data, "t10k-images-idx3-ubyte")).reshape(-1, layers[0]).astype(np.float32) / 255
    y = read_idx(find(data, "t10k-labels-idx1-ubyte"))

    # Dense layers h @ W + b with W of shape [in, out]; ReLU between layers.
    h = x
    depth = len(layers) - 1
    for l in range(1, depth + 1):
        h = h @ tensors[f"fc{l}.weight"] + tensors[f"fc{l}.bias"]
        if l < depth:
            h = np.maximum(h, 0)
    correct = int((h.argmax(axis=1) == y).sum())

    print(f"model: {'-'.join(map(str, layers))} MLP from {export}")
    print(f"test accuracy, Python (safetensors + NumPy): {correct / len(y):.4f} ({correct} of {len(y)})")
    print(f"test accuracy, the run (card.json):           {card['metrics']['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
