"""Fashion-MNIST for the example model: a NumPy-only reader and a data-file writer.

The example ResNet (``fmnist_resnet.onnx``) was trained on Fashion-MNIST as
shipped by the Debian package ``dataset-fashion-mnist`` (IDX files, gzipped, in
``/usr/share/datasets/fashion-mnist``). This module reads those files without
torch, applies *exactly* the normalisation used in training
(:func:`normalise`), and writes the ``.npz`` / ``.npy`` files that
``nbsmt-onnx transform --calib`` and ``nbsmt-onnx evaluate --data/--labels``
consume::

    python models/fashion_mnist/data.py --out out/fmnist

writes ``calib.npz`` (a seeded random sample of N training images, default
2000), ``calib_labels.npy``, ``eval.npz`` (the 10,000 test images),
``eval_labels.npy`` and ``manifest.json`` (what was written and from where).
The ``.npz`` files are keyed by the model's input name, ``input``, and hold
float32 NCHW arrays of shape [N, 1, 28, 28].

Calibration images come from the training split and evaluation images from
the test split, so the two sets never overlap.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Where Debian's ``dataset-fashion-mnist`` installs the IDX files.
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides :data:`DEFAULT_ROOT`.
ROOT_ENV = "FASHION_MNIST_DIR"
#: Name of the ONNX model's input (and the key of the ``.npz`` files).
INPUT_NAME = "input"
#: Per-pixel normalisation used in training: ``(x / 255 - MEAN) / STD``.
#: MEAN/STD are the pixel mean and standard deviation of the 60,000 training
#: images (0.28604 / 0.35302), rounded to 4 digits and frozen here so that the
#: data files always match the committed model.
MEAN = 0.2860
STD = 0.3530
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (third byte of the magic number) -> NumPy big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def default_root() -> Path:
    """The data directory: ``$FASHION_MNIST_DIR`` if set, else Debian's location."""
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else DEFAULT_ROOT


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzipped, decided by the ``.gz`` suffix).

    The IDX header is two zero bytes, a type code, the number of dimensions,
    then one big-endian uint32 per dimension; the data follow in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes) but the "
            f"file holds {len(raw) - header} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install it with "
        f"'apt-get install dataset-fashion-mnist' or set {ROOT_ENV} to the folder holding it"
    )


def load_split(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of a split: uint8 [N, 28, 28] and int64 [N].

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(_SPLIT_FILES)}")
    base = Path(root) if root is not None else default_root()
    img_stem, lbl_stem = _SPLIT_FILES[split]
    images = read_idx(_find(base, img_stem))
    labels = read_idx(_find(base, lbl_stem)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"Fashion-MNIST {split}: labels outside 0..{NUM_CLASSES - 1}")
    return images, labels


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], normalised as in training."""
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)


def calibration_indices(num_train: int, num_samples: int, seed: int) -> np.ndarray:
    """Seeded random choice (without replacement, sorted) of training-image indices."""
    if not 0 < num_samples <= num_train:
        raise ValueError(f"num_samples must be in 1..{num_train}, got {num_samples}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_train, size=num_samples, replace=False))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_data_files(
    out_dir: str | Path,
    num_calib: int = 2000,
    seed: int = 0,
    root: str | Path | None = None,
    num_eval: int | None = None,
) -> dict[str, Any]:
    """Write calib/eval ``.npz`` (key :data:`INPUT_NAME`) and label ``.npy`` files.

    ``num_eval`` limits the evaluation set to the first N test images (all
    10,000 by default). Returns the manifest that is also written to
    ``manifest.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y = load_split("train", root)
    test_x, test_y = load_split("test", root)
    idx = calibration_indices(train_x.shape[0], num_calib, seed)
    if num_eval is not None:
        if not 0 < num_eval <= test_x.shape[0]:
            raise ValueError(f"num_eval must be in 1..{test_x.shape[0]}, got {num_eval}")
        test_x, test_y = test_x[:num_eval], test_y[:num_eval]

    files = {
        "calib": (normalise(train_x[idx]), train_y[idx]),
        "eval": (normalise(test_x), test_y),
    }
    manifest: dict[str, Any] = {
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "source": str(Path(root) if root is not None else default_root()),
        "input_name": INPUT_NAME,
        "layout": "NCHW float32 [N, 1, 28, 28]",
        "normalisation": f"(x / 255 - {MEAN}) / {STD}",
        "calib": {
            "split": "train",
            "num_samples": int(idx.size),
            "seed": seed,
            "selection": "numpy.random.default_rng(seed).choice(60000, N, replace=False), sorted",
        },
        "eval": {"split": "test", "num_samples": int(test_x.shape[0]), "selection": "first N"},
    }
    hashes: dict[str, str] = {}
    for name, (x, y) in files.items():
        data_path = out / f"{name}.npz"
        label_path = out / f"{name}_labels.npy"
        np.savez(data_path, **{INPUT_NAME: x})
        np.save(label_path, y.astype(np.int64))
        hashes[data_path.name] = _sha256(data_path)
        hashes[label_path.name] = _sha256(label_path)
    manifest["sha256"] = hashes
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-calib", type=int, default=2000,
                        help="number of training images in calib.npz (default 2000)")
    parser.add_argument("--num-eval", type=int, default=None,
                        help="use only the first N test images (default: all 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    parser.add_argument("--root", type=Path, default=None,
                        help=f"folder with the IDX files (default ${ROOT_ENV} or {DEFAULT_ROOT})")
    args = parser.parse_args(argv)
    try:
        manifest = write_data_files(args.out, args.num_calib, args.seed, args.root, args.num_eval)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    calib = manifest["calib"]["num_samples"]
    evaluation = manifest["eval"]["num_samples"]
    print(f"wrote {calib} calibration and {evaluation} evaluation images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
