"""Data files for the MobileNetV2 ImageNet models (NumPy + Pillow; no torch).

Writes, into ``--out DIR``, ``.npz`` files keyed ``input`` (float32 NCHW
[N, 3, 224, 224], ImageNet mean/std normalised, RGB):

* ``imagenet20.npz`` + ``imagenet20_labels.npy`` — the 20 labelled ImageNet
  validation images that PyPI ``foolbox==3.3.4`` ships in ``foolbox/data``
  (``imagenet_<index>_<label>.jpg``), preprocessed the standard way: resize
  the shorter side to 256 (antialiased bilinear), center-crop 224.
* ``photos_calib.npz`` and ``photos_heldout.npz`` — unlabelled natural photos
  from the ``skimage/data`` folder of PyPI ``scikit-image`` (plus
  ``grace_hopper.jpg`` from matplotlib's sample data), cut into seeded random
  square crops resized to 224. The split is by SOURCE image, so no pixel of a
  held-out crop was seen in calibration (the stereo pair
  ``motorcycle_left/right`` is one source). Grayscale photos are repeated
  to 3 channels. Default sizes: 126 calibration and 192 held-out crops.
* ``manifest.json`` — sources, crop boxes, seeds and file hashes.

Only Pillow is used, and only to decode PNG/JPEG; resizing, cropping and
normalisation are NumPy code in this file (:func:`resize`,
:func:`center_crop`, :func:`normalize`), so the same preprocessing can be
reproduced anywhere. The resize is the separable triangle-filter
(bilinear, antialiased when shrinking) resampling that Pillow's
``Image.resize(..., BILINEAR)`` and torchvision's ``Resize`` perform, computed in
float64 without Pillow's intermediate 8-bit rounding.

Usage (in the torch venv made by ``models/build_all.sh``, or any venv with
numpy, Pillow, scikit-image==0.26.0, foolbox==3.3.4 --no-deps and matplotlib)::

    python models/mobilenetv2/make_data.py --out out/mobilenetv2

In a venv without those packages (e.g. the project's, for tests), add
``--download-dir DIR``: their pinned wheels are downloaded there with
``pip download --no-deps`` and only the image folders are extracted.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "input"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = 256
CROP = 224


@dataclass(frozen=True)
class PhotoSource:
    """One source scene: its files (several only for a stereo pair) and split."""

    name: str
    files: tuple[str, ...]
    package: str  # "skimage" or "matplotlib"
    split: str  # "calib" or "heldout"


# Natural photographs only: synthetic images (chessboard, color, logo,
# phantom, text, page), silhouettes (horse), tiny (microaneurysms) and medical
# or microscopy images (retina, ihc, cell) are left out. Each split mixes
# colour and grayscale photos and indoor / outdoor / astronomical scenes.
PHOTO_SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("chelsea", ("chelsea.png",), "skimage", "calib"),
    PhotoSource("rocket", ("rocket.jpg",), "skimage", "calib"),
    PhotoSource("hubble_deep_field", ("hubble_deep_field.jpg",), "skimage", "calib"),
    PhotoSource("coins", ("coins.png",), "skimage", "calib"),
    PhotoSource("gravel", ("gravel.png",), "skimage", "calib"),
    PhotoSource("brick", ("brick.png",), "skimage", "calib"),
    PhotoSource("astronaut", ("astronaut.png",), "skimage", "heldout"),
    PhotoSource("coffee", ("coffee.png",), "skimage", "heldout"),
    PhotoSource("motorcycle", ("motorcycle_left.png", "motorcycle_right.png"), "skimage",
                "heldout"),
    PhotoSource("grace_hopper", ("grace_hopper.jpg",), "matplotlib", "heldout"),
    PhotoSource("camera", ("camera.png",), "skimage", "heldout"),
    PhotoSource("grass", ("grass.png",), "skimage", "heldout"),
    PhotoSource("moon", ("moon.png",), "skimage", "heldout"),
    PhotoSource("clock_motion", ("clock_motion.png",), "skimage", "heldout"),
)


# ---------------------------------------------------------------- preprocessing
def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3] (grayscale repeated, alpha dropped)."""
    from PIL import Image  # decoding only; imported here so the rest needs just NumPy

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L") if im.mode in ("L", "I;16", "I", "F", "1")
                         else im.convert("RGB"))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _resample_matrix(in_size: int, out_size: int, start: float = 0.0,
                     length: float | None = None) -> np.ndarray:
    """[out_size, in_size] weights of a triangle (bilinear) filter mapping the
    input interval [start, start + length) onto out_size pixels; the filter is
    widened by the scale factor when shrinking (antialiasing), as Pillow does."""
    length = float(in_size) if length is None else length
    scale = length / out_size
    support = max(scale, 1.0)
    centers = start + (np.arange(out_size) + 0.5) * scale
    pos = np.arange(in_size) + 0.5
    w = np.clip(1.0 - np.abs(pos[None, :] - centers[:, None]) / support, 0.0, None)
    sums = w.sum(axis=1, keepdims=True)
    if np.any(sums == 0):
        raise ValueError("resample window outside the image")
    return w / sums


def resize(img: np.ndarray, height: int, width: int,
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Resize (a ``box`` = (left, top, right, bottom) region of) an [H, W, C]
    image to [height, width, C] float64 with antialiased bilinear filtering."""
    h, w = img.shape[:2]
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(w), float(h))
    wy = _resample_matrix(h, height, top, bottom - top)
    wx = _resample_matrix(w, width, left, right - left)
    x = img.astype(np.float64)
    return np.einsum("oh,hwc,pw->opc", wy, x, wx, optimize=True)


def resize_shorter(img: np.ndarray, size: int = RESIZE) -> np.ndarray:
    """Resize so the shorter side is ``size`` (longer side truncated, as torchvision)."""
    h, w = img.shape[:2]
    if h <= w:
        return resize(img, size, int(size * w / h))
    return resize(img, int(size * h / w), size)


def center_crop(img: np.ndarray, size: int = CROP) -> np.ndarray:
    """Central ``size`` x ``size`` crop (offsets rounded as torchvision does)."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} smaller than the crop {size}")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return img[top:top + size, left:left + size]


def normalize(img: np.ndarray) -> np.ndarray:
    """[H, W, 3] pixel values in 0..255 -> float32 [3, H, W], ImageNet mean/std."""
    x = np.asarray(img, dtype=np.float64) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess_imagenet(path: str | Path) -> np.ndarray:
    """The standard ImageNet evaluation pipeline: decode, resize 256, crop 224, normalise."""
    return normalize(center_crop(resize_shorter(load_rgb(path), RESIZE), CROP))


# ---------------------------------------------------------------- data sources
# Import name -> (PyPI name, pinned version) of the packages whose files we read.
DATA_PACKAGES = {
    "foolbox": ("foolbox", "3.3.4"),
    "skimage": ("scikit-image", "0.26.0"),
    "matplotlib": ("matplotlib", None),
}


def _download_package_dir(package: str, sub: str, download_dir: Path) -> Path:
    """``pip download --no-deps`` the package's wheel and extract only ``package/sub``."""
    pypi_name, version = DATA_PACKAGES[package]
    target = download_dir / package
    folder = target / package / sub
    if folder.is_dir():
        return folder
    spec = f"{pypi_name}=={version}" if version else pypi_name
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(download_dir / "wheels"), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    prefix = pypi_name.replace("-", "_").lower()
    wheels = [w for w in (download_dir / "wheels").glob("*.whl")
              if w.name.lower().startswith(prefix + "-")]
    if proc.returncode != 0 or not wheels:
        raise FileNotFoundError(f"'{' '.join(cmd)}' failed:\n{proc.stderr.strip()}")
    member_prefix = f"{package}/{sub}/"
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [m for m in zf.namelist() if m.startswith(member_prefix)]
        zf.extractall(target, members)
    if not folder.is_dir():
        raise FileNotFoundError(f"{wheels[0].name} has no {member_prefix}")
    return folder


def package_dir(package: str, sub: str, download_dir: Path | None = None) -> Path:
    """Folder ``sub`` inside an installed package, found without importing it
    (importing foolbox would need its unused dependencies). If the package is
    not installed and ``download_dir`` is given, its pinned wheel is downloaded
    there and only that folder is extracted (no install, no dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        if download_dir is not None:
            return _download_package_dir(package, sub, download_dir)
        pypi_name, version = DATA_PACKAGES.get(package, (package, None))
        raise FileNotFoundError(
            f"Python package {pypi_name}{'==' + version if version else ''} is not installed; "
            f"pip install --no-deps it, or pass --download-dir to fetch its wheel"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist (unexpected {package} version?)")
    return path


_IMAGENET_NAME = re.compile(r"imagenet_(\d+)_(\d+)\.(?:jpg|jpeg|png)$")


def imagenet_samples(folder: Path) -> list[tuple[Path, int]]:
    """foolbox's labelled ImageNet samples, ``imagenet_<index>_<label>.jpg``, in index order."""
    items = []
    for p in folder.iterdir():
        m = _IMAGENET_NAME.fullmatch(p.name)
        if m:
            items.append((int(m.group(1)), p, int(m.group(2))))
    if not items:
        raise FileNotFoundError(f"no imagenet_<index>_<label>.jpg files in {folder}")
    return [(p, label) for _, p, label in sorted(items)]


def random_crops(img: np.ndarray, count: int, rng: np.random.Generator,
                 min_frac: float = 0.35, size: int = CROP) -> tuple[np.ndarray, list[str]]:
    """``count`` random square crops (side uniform in [min_frac, 1] x the shorter
    side, random position, random horizontal flip), each resized to ``size``.
    Returns uint8-range float arrays [count, size, size, 3] and the crop boxes
    as "left,top,side,flip" strings (pixels of the source image)."""
    h, w = img.shape[:2]
    short = min(h, w)
    out = np.empty((count, size, size, 3), dtype=np.float64)
    boxes = []
    for i in range(count):
        side = rng.uniform(min_frac, 1.0) * short
        left = rng.uniform(0.0, w - side)
        top = rng.uniform(0.0, h - side)
        crop = resize(img, size, size, (left, top, left + side, top + side))
        flip = bool(rng.random() < 0.5)
        out[i] = crop[:, ::-1] if flip else crop
        boxes.append(f"{left:.2f},{top:.2f},{side:.2f},{int(flip)}")
    return out, boxes


def _split_counts(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_data_files(out_dir: str | Path, num_calib: int = 126, num_heldout: int = 192,
                     seed: int = 0, download_dir: Path | None = None) -> dict[str, Any]:
    """Write the three data sets described in the module docstring; return the manifest.

    ``download_dir``: where to fetch the wheels of packages that are not installed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"input_name": INPUT_NAME, "layout": "NCHW float32 RGB",
                                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "seed": seed}

    # (a) labelled ImageNet samples.
    samples = imagenet_samples(package_dir("foolbox", "data", download_dir))
    x = np.stack([preprocess_imagenet(p) for p, _ in samples])
    y = np.asarray([label for _, label in samples], dtype=np.int64)
    np.savez(out / "imagenet20.npz", **{INPUT_NAME: x})
    np.save(out / "imagenet20_labels.npy", y)
    manifest["imagenet20"] = {
        "source": "PyPI foolbox==3.3.4, foolbox/data/imagenet_*.jpg",
        "preprocessing": f"resize shorter side {RESIZE} (antialiased bilinear), "
                         f"center crop {CROP}, ImageNet mean/std",
        "files": [p.name for p, _ in samples], "labels": y.tolist(),
    }

    # (b) unlabelled photo crops, split by source scene.
    folders = {"skimage": package_dir("skimage", "data", download_dir),
               "matplotlib": package_dir("matplotlib", "mpl-data/sample_data", download_dir)}
    for split, total in (("calib", num_calib), ("heldout", num_heldout)):
        sources = [s for s in PHOTO_SOURCES if s.split == split]
        images, records = [], []
        for src, n_src in zip(sources, _split_counts(total, len(sources)), strict=True):
            # One generator per source (seeded by its position in PHOTO_SOURCES), so
            # changing the crop count of one source does not move the others' crops.
            rng = np.random.default_rng([seed, PHOTO_SOURCES.index(src)])
            for f, n_file in zip(src.files, _split_counts(n_src, len(src.files)), strict=True):
                if n_file == 0:
                    continue
                img = load_rgb(folders[src.package] / f)
                crops, boxes = random_crops(img, n_file, rng)
                images.extend(normalize(c) for c in crops)
                records.append({"source": src.name, "file": f"{src.package}:{f}",
                                "image_hw": list(img.shape[:2]), "count": n_file,
                                "crops_left_top_side_flip": boxes})
        np.savez(out / f"photos_{split}.npz", **{INPUT_NAME: np.stack(images)})
        manifest[f"photos_{split}"] = {"num_samples": len(images), "sources": records}

    manifest["sha256"] = {p.name: _sha256(p) for p in sorted(out.glob("*.np[yz]"))}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-calib", type=int, default=126)
    parser.add_argument("--num-heldout", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--download-dir", type=Path, default=None,
                        help="fetch the wheels of missing data packages (foolbox, scikit-image, "
                             "matplotlib) into this folder instead of failing")
    args = parser.parse_args(argv)
    try:
        m = write_data_files(args.out, args.num_calib, args.num_heldout, args.seed,
                             args.download_dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(m['imagenet20']['labels'])} labelled ImageNet images, "
          f"{m['photos_calib']['num_samples']} calibration and "
          f"{m['photos_heldout']['num_samples']} held-out photo crops to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
