"""Data for the PP-OCRv4 text detector (``det``) and recogniser (``rec``) of RapidOCR 1.4.4.

Both models are scored by fidelity to the float model (no labels), so the data
only has to look like what RapidOCR feeds them; calibration and held-out sets
never share a source photo or a sentence.

* ``det_calib.npz`` / ``det_heldout.npz`` (key ``x``, float32 [N, 3, 320, 320]):
  seeded random square crops of the natural photos of PyPI ``scikit-image``
  (and matplotlib's sample photo), split by source photo exactly as
  ``models/mobilenetv2/make_data.py`` splits them; on every second crop 2-6
  rendered text lines (``make_data.render_line``) are pasted at random places,
  so the detector sees text on natural backgrounds. Normalised as RapidOCR's
  detector does (``config.yaml``: ``mean = std = 0.5``): ``(x / 255 - 0.5) / 0.5``.
  320 is a multiple of 32, as the detector requires.
* ``rec_calib.npz`` / ``rec_heldout.npz`` (key ``x``, float32 [N, 3, 48, 320]):
  rendered text lines (``make_data.render_line``; calibration and held-out
  sentences from disjoint halves of the word list), resized to height 48
  keeping the aspect ratio (width <= 320), ``(x / 255 - 0.5) / 0.5``,
  zero right-padding: RapidOCR's ``rec_img_shape [3, 48, 320]``.

Usage (the project's venv; photos are fetched with ``--download-dir`` as in
``models/mobilenetv2/make_data.py``)::

    python models/thirdparty/make_ocr_data.py --out P --download-dir W
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.mobilenetv2.make_data import (
    PHOTO_SOURCES,
    load_rgb,
    package_dir,
    random_crops,
)
from models.thirdparty.make_data import _WORDS, _sentence, render_line

INPUT_NAME = "x"
DET_SIZE = 320
REC_HEIGHT, REC_WIDTH = 48, 320


def _normalise(img: np.ndarray) -> np.ndarray:
    """uint8-range HWC -> float32 CHW, ``(x / 255 - 0.5) / 0.5``."""
    return ((np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _paste_text(img: np.ndarray, rng: np.random.Generator, words: list[str]) -> np.ndarray:
    out = img.copy()
    size = out.shape[0]
    for _ in range(int(rng.integers(2, 7))):
        line = render_line(_sentence(rng, words), rng).astype(np.float64)
        h, w = line.shape[:2]
        if w > size - 4:  # shrink long lines to fit (nearest neighbour, enough for text)
            new_w = size - 4
            new_h = max(8, int(h * new_w / w))
            ys = (np.arange(new_h) * h / new_h).astype(int)
            xs = (np.arange(new_w) * w / new_w).astype(int)
            line, h, w = line[ys][:, xs], new_h, new_w
        if h >= size - 4:
            continue
        top = int(rng.integers(0, size - h))
        left = int(rng.integers(0, size - w))
        out[top : top + h, left : left + w] = line
    return out


def det_set(split: str, total: int, seed: int, download_dir: Path | None) -> np.ndarray:
    folders = {
        "skimage": package_dir("skimage", "data", download_dir),
        "matplotlib": package_dir("matplotlib", "mpl-data/sample_data", download_dir),
    }
    sources = [s for s in PHOTO_SOURCES if s.split == split]
    words = _WORDS[0::2] if split == "calib" else _WORDS[1::2]
    base, extra = divmod(total, len(sources))
    xs = []
    for i, src in enumerate(sources):
        n = base + (1 if i < extra else 0)
        if n == 0:
            continue
        rng = np.random.default_rng([seed, 100 + PHOTO_SOURCES.index(src)])
        img = load_rgb(folders[src.package] / src.files[0])
        crops, _ = random_crops(img, n, rng, size=DET_SIZE)
        for j, crop in enumerate(crops):
            if j % 2 == 0:
                crop = _paste_text(crop, rng, words)
            xs.append(_normalise(np.clip(crop, 0, 255)))
    order = np.random.default_rng([seed, 7]).permutation(len(xs))
    return np.stack([xs[k] for k in order])


def rec_preprocess(line: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = line.shape[:2]
    new_w = min(REC_WIDTH, int(np.ceil(REC_HEIGHT * w / h)))
    resized = np.asarray(Image.fromarray(line).resize((new_w, REC_HEIGHT), Image.BILINEAR))
    out = np.zeros((3, REC_HEIGHT, REC_WIDTH), dtype=np.float32)
    out[:, :, :new_w] = _normalise(resized)
    return out


def rec_set(split: str, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 200 + (split == "heldout")])
    words = _WORDS[0::2] if split == "calib" else _WORDS[1::2]
    return np.stack([rec_preprocess(render_line(_sentence(rng, words), rng)) for _ in range(count)])


def write_data_files(
    out_dir: Path, num_calib: int, num_heldout: int, seed: int, download_dir: Path | None
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "input_name": INPUT_NAME,
        "seed": seed,
        "normalisation": "(x/255-0.5)/0.5 (RapidOCR config.yaml)",
    }
    for split, count in (("calib", num_calib), ("heldout", num_heldout)):
        np.savez(
            out_dir / f"det_{split}.npz", **{INPUT_NAME: det_set(split, count, seed, download_dir)}
        )
        np.savez(out_dir / f"rec_{split}.npz", **{INPUT_NAME: rec_set(split, count, seed)})
        manifest[split] = count
    manifest["sha256"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out_dir.glob("*_*.npz"))
        if p.name.startswith(("det_", "rec_"))
    }
    (out_dir / "ocr_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--num-calib", type=int, default=128)
    parser.add_argument("--num-heldout", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--download-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        write_data_files(args.out, args.num_calib, args.num_heldout, args.seed, args.download_dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote det/rec calibration ({args.num_calib}) and held-out ({args.num_heldout}) "
        f"sets to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
