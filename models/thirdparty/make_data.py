"""Labelled text-line images for the PaddleOCR orientation classifier (``cls``).

``ch_ppocr_mobile_v2.0_cls_infer.onnx`` tells whether a cropped text line is
upright (class 0, "0") or upside down (class 1, "180"). This script renders
English text lines with Pillow's built-in font (varied size, contrast,
polarity, margins and noise, all seeded), turns a random half of them by 180
degrees, and preprocesses them the way RapidOCR/PaddleOCR feed the model:
resize to height 48 keeping the aspect ratio (width capped at 192),
``(x / 255 - 0.5) / 0.5`` on RGB, right-padded with 0 to 3 x 48 x 192.

Writes into ``--out DIR``: ``text_calib.npz`` (default 128 lines, seed
``seed``) and ``text_eval.npz`` (default 512 lines, seed ``seed + 1``; the
sentences are drawn from disjoint halves of the word list, so no calibration
line reappears in evaluation), both keyed ``x`` (the model's input name) as
float32 [N, 3, 48, 192], plus ``text_calib_labels.npy`` / ``text_eval_labels.npy``
(int64, 0 = upright, 1 = rotated 180) and ``manifest.json``.

Needs NumPy and Pillow >= 10.1 (for the scalable built-in font)::

    python models/thirdparty/make_data.py --out out/thirdparty
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "x"
HEIGHT, WIDTH = 48, 192

_WORDS = (
    "accelerator array batch bias calibration channel collision compute data deploy "
    "engine error export float graph hardware integer kernel layer model multiply "
    "network noise operand output pipeline quantize recover report runtime sample "
    "scale share simulate statistics systolic tensor thread utilization weight zero "
    "apple bridge candle desert engine forest garden harbor island jacket kitchen "
    "letter market number orange pencil quarter river silver ticket umbrella valley "
    "window yellow morning evening station library museum theatre village mountain "
    "The and of to in for with from on by at is are was were will can may new old"
).split()


def _sentence(rng: np.random.Generator, words: list[str]) -> str:
    n = int(rng.integers(2, 7))
    text = " ".join(str(w) for w in rng.choice(words, size=n))
    if rng.random() < 0.3:
        text = text.capitalize()
    if rng.random() < 0.3:
        text += f" {int(rng.integers(0, 10000))}"
    return text


def render_line(text: str, rng: np.random.Generator) -> np.ndarray:
    """Render ``text`` as a uint8 RGB [h, w, 3] text-line crop with seeded style."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(18, 40)))
    left, top, right, bottom = font.getbbox(text)
    mx, my = int(rng.integers(2, 16)), int(rng.integers(2, 10))
    w, h = right - left + 2 * mx, bottom - top + 2 * my
    dark_on_light = rng.random() < 0.8
    bg = int(rng.integers(170, 256)) if dark_on_light else int(rng.integers(0, 80))
    fg = int(rng.integers(0, 90)) if dark_on_light else int(rng.integers(180, 256))
    tint = rng.integers(-25, 26, size=3)
    img = Image.new("L", (w, h), bg)
    ImageDraw.Draw(img).text((mx - left, my - top), text, font=font, fill=fg)
    arr = np.asarray(img, dtype=np.float64)[:, :, None] + tint[None, None, :]
    arr += rng.normal(0.0, rng.uniform(0.0, 8.0), size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def preprocess(line: np.ndarray) -> np.ndarray:
    """RapidOCR's classifier input: height 48, width min(192, ceil(48 * w / h)),
    ``(x / 255 - 0.5) / 0.5``, zero right-padding -> float32 [3, 48, 192]."""
    from PIL import Image

    h, w = line.shape[:2]
    new_w = min(WIDTH, int(np.ceil(HEIGHT * w / h)))
    resized = np.asarray(Image.fromarray(line).resize((new_w, HEIGHT), Image.BILINEAR))
    x = (resized.astype(np.float32) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :new_w] = x.transpose(2, 0, 1)
    return out


def make_set(count: int, seed: int, words: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` preprocessed lines, their labels (balanced, shuffled) and texts."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int64) % 2
    rng.shuffle(labels)
    xs, texts = [], []
    for label in labels:
        text = _sentence(rng, words)
        line = render_line(text, rng)
        if label == 1:
            line = line[::-1, ::-1]
        xs.append(preprocess(np.ascontiguousarray(line)))
        texts.append(text)
    return np.stack(xs), labels, texts


def write_data_files(out_dir: str | Path, num_calib: int = 128, num_eval: int = 512,
                     seed: int = 0) -> dict[str, Any]:
    """Write the calibration and evaluation sets; return the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Alternate words between the two sets so their sentences are disjoint.
    halves = {"calib": _WORDS[0::2], "eval": _WORDS[1::2]}
    manifest: dict[str, Any] = {
        "model": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "input_name": INPUT_NAME,
        "layout": f"NCHW float32 [N, 3, {HEIGHT}, {WIDTH}]",
        "preprocessing": "resize to height 48 keeping aspect (width <= 192), "
                         "(x/255-0.5)/0.5, right zero-padding",
        "labels": {"0": "upright", "1": "rotated 180 degrees"},
    }
    for i, (name, count) in enumerate((("calib", num_calib), ("eval", num_eval))):
        x, y, texts = make_set(count, seed + i, halves[name])
        np.savez(out / f"text_{name}.npz", **{INPUT_NAME: x})
        np.save(out / f"text_{name}_labels.npy", y)
        manifest[f"text_{name}"] = {"num_samples": count, "seed": seed + i,
                                    "first_texts": texts[:10]}
    manifest["sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(out.glob("text_*.np[yz]"))}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-calib", type=int, default=128)
    parser.add_argument("--num-eval", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        write_data_files(args.out, args.num_calib, args.num_eval, args.seed)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.num_calib} calibration and {args.num_eval} evaluation text lines "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
