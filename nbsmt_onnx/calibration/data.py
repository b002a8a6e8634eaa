"""Calibration data: where samples come from, how they are sampled, batched and validated.

Sources (:func:`open_calibration_data` picks one from what the user passed):

- ``.npz`` keyed by input name (a single-input model also takes the unkeyed
  ``arr_0`` of ``np.savez(path, x)``) or a single ``.npy`` for a single-input
  model. An array whose rank equals the model input's rank holds samples
  along axis 0; an array of rank one less is one sample.
- a folder of ``.npy`` / ``.npz`` files (the same rules per file; only the
  headers are read until a sample is needed);
- a folder of images (PNG/JPEG, searched recursively) for a model with one
  4-D input, preprocessed as :class:`~nbsmt_onnx.config.ImagePreprocessing`
  says; decoding needs Pillow (the ``nbsmt-onnx[images]`` extra);
- ``"random"``: standard-normal samples, for smoke tests only;
- in the Python API: a mapping of arrays (like an ``.npz``), or an iterable of
  feed dicts, each one a complete batch passed to the model as is.

A *sample* is one slice along axis 0 (the batch axis) of every input.
Indexable sources draw ``num_samples`` of them with ``np.random.default_rng(seed)``
(a random subset in random order, reproducible); feed iterables are taken in
order. Samples are stacked into batches of ``batch_size``, or of the model's
batch size when it is fixed. Every sample is checked against the model's
input names, dtypes and shapes, and for NaN/Inf, before it reaches a session;
errors name the input and the sample. Data are streamed: only the batch being
built (and, for ``.npz``, the arrays of the open file) is in memory.
"""

from __future__ import annotations

import logging
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from nbsmt_onnx.config import DataLayout, ImagePreprocessing
from nbsmt_onnx.errors import ConfigError, DataError, InternalError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
RANDOM = "random"

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, NumPy dtype, shape (None for a dynamic dimension), batch axis.

    ``batch_axis``: the axis that holds the samples (0 unless a
    :class:`~nbsmt_onnx.config.DataLayout` says otherwise); ``None`` for an
    input that is constant across samples (fed with its exact shape).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    batch_axis: int | None = 0

    def describe(self) -> str:
        dims = [
            "N" if i == self.batch_axis and d is None else ("?" if d is None else str(d))
            for i, d in enumerate(self.shape)
        ]
        return "(" + ", ".join(dims) + ")"

    @property
    def fixed_batch(self) -> int | None:
        if self.batch_axis is None or self.batch_axis >= len(self.shape):
            return None
        return self.shape[self.batch_axis]

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        """The shape of one sample: the input's shape without the batch axis."""
        if self.batch_axis is None:
            return self.shape
        return self.shape[: self.batch_axis] + self.shape[self.batch_axis + 1 :]


def model_inputs(model: onnx.ModelProto, layout: DataLayout | None = None) -> tuple[InputSpec, ...]:
    """The inputs a caller must feed (graph inputs that are not initializers), with their layout.

    Scalar inputs are constant (they have no batch axis); ``layout`` sets other
    inputs' batch axis or declares them constant.
    """
    specs = _declared_inputs(model)
    layout = layout or DataLayout()
    names = {s.name for s in specs}
    unknown = sorted(({n for n, _ in layout.batch_axes} | {n for n, _ in layout.constants}) - names)
    if unknown:
        raise ConfigError(
            f"data layout names unknown input(s) {', '.join(unknown)}; the model's inputs are "
            + ", ".join(f"{s.name} {s.describe()}" for s in specs)
        )
    axes = dict(layout.batch_axes)
    constants = {n for n, _ in layout.constants}
    out = []
    for spec in specs:
        if spec.name in constants or not spec.shape:
            out.append(replace(spec, batch_axis=None))
        elif spec.name in axes:
            axis = axes[spec.name]
            if axis >= len(spec.shape):
                raise ConfigError(
                    f"batch axis {axis} of input {spec.name!r} is out of range: it has "
                    f"{len(spec.shape)} axes {spec.describe()}"
                )
            out.append(replace(spec, batch_axis=axis))
        else:
            out.append(spec)
    return tuple(out)


def _declared_inputs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise DataError(
                f"model input {vi.name!r} is not a tensor; calibration supports tensor inputs only"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape: tuple[int | None, ...] = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tt.shape.dim
        )
        specs.append(InputSpec(vi.name, np.dtype(dtype), shape))
    return tuple(specs)


# --------------------------------------------------------------------------- validation


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class _Validator:
    """Checks samples/feeds against the model inputs; casts float precision once, with a log line."""

    def __init__(self, specs: tuple[InputSpec, ...], where: str, images: bool = False) -> None:
        self.specs = specs
        self.where = where
        self.images = images
        self._cast_logged: set[str] = set()

    def _names(self, keys: Iterable[str], index: int, what: str) -> None:
        keys = set(keys)
        expected = {s.name for s in self.specs}
        missing = sorted(expected - keys)
        extra = sorted(keys - expected)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(missing)}")
            if extra:
                parts.append(f"unknown input(s) {', '.join(extra)}")
            raise DataError(
                f"{self.where}: {what} {index}: {'; '.join(parts)}; the model's inputs are "
                + ", ".join(f"{s.name} {s.describe()}" for s in self.specs)
            )

    def _array(self, spec: InputSpec, value: Any, index: int, batched: bool) -> np.ndarray:
        arr = np.asarray(value)
        if arr.dtype != spec.dtype:
            if arr.dtype.kind == "f" and spec.dtype.kind == "f":
                if spec.name not in self._cast_logged:
                    log.info(
                        "%s: casting input %r from %s to %s",
                        self.where,
                        spec.name,
                        arr.dtype,
                        spec.dtype,
                    )
                    self._cast_logged.add(spec.name)
                arr = arr.astype(spec.dtype)
            else:
                raise DataError(
                    f"{self.where}: input {spec.name!r} sample {index} has dtype {arr.dtype}; "
                    f"the model expects {spec.dtype}"
                )
        expected = spec.shape if batched or spec.batch_axis is None else spec.sample_shape
        ok = arr.ndim == len(expected) and all(
            e is None or e == a for e, a in zip(expected, arr.shape, strict=True)
        )
        if not ok:
            hint = " (resize images with --resize/--center-crop)" if self.images else ""
            what = "feed" if batched else "sample" if spec.batch_axis is not None else "constant"
            raise DataError(
                f"{self.where}: input {spec.name!r} {what} {index} has shape {_fmt_shape(arr.shape)}; "
                f"the model expects {spec.describe() if batched else _fmt_shape_spec(expected)}{hint}"
            )
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            bad = "NaN" if np.any(np.isnan(arr)) else "Inf"
            raise DataError(
                f"{self.where}: input {spec.name!r} sample {index} contains {bad}; clean the data"
            )
        return arr

    def sample(self, sample: Mapping[str, Any], index: int) -> Feed:
        """Check one sample of the batched inputs (constants are checked by :meth:`constant`)."""
        batched = [s for s in self.specs if s.batch_axis is not None]
        keys = set(sample.keys())
        missing = sorted({s.name for s in batched} - keys)
        if missing:
            self._names(
                keys | {s.name for s in self.specs if s.batch_axis is None}, index, "sample"
            )
        return {s.name: self._array(s, sample[s.name], index, batched=False) for s in batched}

    def constant(self, spec: InputSpec, value: Any) -> np.ndarray:
        """Check an input that is fed unchanged with every batch."""
        return self._array(spec, value, 0, batched=False)

    def feed(self, feed: Mapping[str, Any], index: int) -> Feed:
        self._names(feed.keys(), index, "feed")
        return {s.name: self._array(s, feed[s.name], index, batched=True) for s in self.specs}


def _fmt_shape_spec(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


# --------------------------------------------------------------------------- sources


class IndexedSource:
    """Samples addressable by index: ``len()`` and ``get(i) -> {name: array without batch axis}``.

    ``get`` returns the raw sample; :class:`CalibrationData` validates it
    (names, dtype, shape, NaN/Inf) when it builds a batch.
    """

    description = ""
    #: Inputs fed unchanged with every batch (their arrays, with the input's exact shape).
    constants: dict[str, np.ndarray]

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _split_rank(arr_shape: tuple[int, ...], spec: InputSpec, where: str) -> int | None:
    """How many samples an array holds: shape[0] for rank == model rank, None (=1, no axis) for rank - 1."""
    axis = spec.batch_axis
    if axis is None:
        raise InternalError(f"input {spec.name!r} is constant; it holds no samples")
    if len(arr_shape) == len(spec.shape):
        return int(arr_shape[axis])
    if len(arr_shape) == len(spec.shape) - 1:
        return None
    where_axis = "" if axis == 0 else f" along axis {axis}"
    raise DataError(
        f"{where}: array for input {spec.name!r} has shape {_fmt_shape(arr_shape)}; the model expects "
        f"{spec.describe()} (a stack of samples{where_axis}) or "
        f"{_fmt_shape_spec(spec.sample_shape)} (one sample); an input with the same value for "
        "every sample is declared with --constant NAME, one batched along another axis with "
        "--batch-axis NAME=AXIS"
    )


def _static(spec: InputSpec) -> bool:
    return all(d is not None for d in spec.shape)


def _constant_inputs(
    shapes: Mapping[str, tuple[int, ...]], specs: tuple[InputSpec, ...], where: str
) -> set[str]:
    """Inputs fed as constants: declared ones (``batch_axis`` None) and detected ones.

    An input is detected as constant when its array has the input's exact,
    fully static shape and the batched inputs would otherwise disagree on the
    number of samples or on the model's batch dimension (e.g. a ``[2, 1, 128]``
    state next to ``x [N, 16000]``).
    """
    constant = {s.name for s in specs if s.batch_axis is None or not s.shape}
    batched = [s for s in specs if s.name not in constant]

    def disagree(group: list[InputSpec]) -> bool:
        counts = set()
        for s in group:
            if len(shapes[s.name]) not in (len(s.shape), len(s.shape) - 1):
                return True
            n = _split_rank(shapes[s.name], s, where)
            counts.add(1 if n is None else n)
        return len(counts) > 1 or len({s.fixed_batch for s in group}) > 1

    if len(batched) > 1 and disagree(batched):
        exact = [s for s in batched if _static(s) and tuple(shapes[s.name]) == s.shape]
        rest = [s for s in batched if s not in exact]
        if exact and rest and not disagree(rest):
            for s in exact:
                log.info(
                    "%s: input %r has the model's exact shape %s: fed unchanged with every batch "
                    "(declare --batch-axis %s=AXIS if it holds samples)",
                    where,
                    s.name,
                    _fmt_shape_spec(s.shape),
                    s.name,
                )
            constant |= {s.name for s in exact}
    return constant


def _match_keys(keys: list[str], specs: tuple[InputSpec, ...], where: str) -> dict[str, str]:
    """Map model input name -> key in the file."""
    names = [s.name for s in specs]
    if set(names) <= set(keys):
        extra = sorted(set(keys) - set(names))
        if extra:
            log.warning("%s: ignoring arrays %s (not model inputs)", where, ", ".join(extra))
        return {n: n for n in names}
    if len(specs) == 1 and len(keys) == 1:
        return {names[0]: keys[0]}
    missing = sorted(set(names) - set(keys))
    raise DataError(
        f"{where}: no array for model input(s) {', '.join(missing)}; the file has "
        f"{', '.join(keys) or 'no arrays'}; save it with np.savez(path, **{{input_name: array}})"
    )


class _ArrayGroup:
    """A set of arrays (one per batched input) that share a sample axis (each its own)."""

    def __init__(self, arrays: Mapping[str, Any], specs: tuple[InputSpec, ...], where: str) -> None:
        self.axes = {s.name: int(s.batch_axis or 0) for s in specs}
        counts = {s.name: _split_rank(tuple(np.shape(arrays[s.name])), s, where) for s in specs}
        values = set(counts.values())
        if len(values) != 1:
            raise DataError(
                f"{where}: inputs hold different numbers of samples: "
                + ", ".join(f"{k}={1 if v is None else v}" for k, v in counts.items())
                + "; declare inputs that are the same for every sample with --constant NAME "
                "and ones batched along another axis than 0 with --batch-axis NAME=AXIS"
            )
        (count,) = values
        self.stacked = count is not None
        self.count = 1 if count is None else count
        self.arrays = {s.name: arrays[s.name] for s in specs}

    def get(self, index: int) -> dict[str, np.ndarray]:
        if not self.stacked:
            return {k: np.asarray(v) for k, v in self.arrays.items()}
        return {k: np.take(np.asarray(v), index, axis=self.axes[k]) for k, v in self.arrays.items()}


class ArraySource(IndexedSource):
    """In-memory or memory-mapped arrays: an ``.npz``, an ``.npy`` or a mapping from the API."""

    def __init__(self, arrays: Mapping[str, Any], specs: tuple[InputSpec, ...], where: str) -> None:
        keys = _match_keys(list(arrays.keys()), specs, where)
        self.description = where
        named = {n: arrays[k] for n, k in keys.items()}
        constant = _constant_inputs({n: tuple(np.shape(v)) for n, v in named.items()}, specs, where)
        self.constants = {n: np.asarray(named[n]) for n in sorted(constant)}
        batched = tuple(s for s in specs if s.name not in constant)
        if not batched:
            raise DataError(f"{where}: every model input is constant; nothing holds samples")
        self._group = _ArrayGroup(named, batched, where)

    def __len__(self) -> int:
        return self._group.count

    def get(self, index: int) -> dict[str, np.ndarray]:
        return self._group.get(index)


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def _npy_header_shape(fh: Any) -> tuple[int, ...]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, _ = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _, _ = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape)


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes in an .npy/.npz file, read from the headers only."""
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as fh:
                return {"": _npy_header_shape(fh)}
        with zipfile.ZipFile(path) as z:
            shapes = {}
            for member in z.namelist():
                if member.endswith(".npy"):
                    with z.open(member) as fh:
                        shapes[member[: -len(".npy")]] = _npy_header_shape(fh)
            return shapes
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path}: {err}") from err


class ArrayFolderSource(IndexedSource):
    """A folder of .npy/.npz files; a few decoded files are cached (LRU)."""

    _CACHE_FILES = 4

    def __init__(self, folder: Path, files: list[Path], specs: tuple[InputSpec, ...]) -> None:
        self.description = f"{folder} ({len(files)} array files)"
        self._specs = specs
        self._files = files
        self._index: list[tuple[int, int | None]] = []  # (file, sample within file or None)
        self._keys: list[dict[str, str]] = []
        self._axes = {s.name: int(s.batch_axis or 0) for s in specs}
        constant: set[str] | None = None
        for fi, f in enumerate(files):
            shapes = _file_shapes(f)
            where = str(f)
            if f.suffix.lower() == ".npy":
                if len(specs) != 1:
                    raise DataError(
                        f"{where}: an .npy file holds one array but the model has inputs "
                        f"{', '.join(s.name for s in specs)}; use .npz files keyed by input name"
                    )
                keys = {specs[0].name: ""}
            else:
                keys = _match_keys(list(shapes), specs, where)
            self._keys.append(keys)
            if constant is None:  # from the first file; later files' copies are not read
                constant = _constant_inputs({n: shapes[k] for n, k in keys.items()}, specs, where)
                batched = [s for s in specs if s.name not in constant]
                if not batched:
                    raise DataError(
                        f"{where}: every model input is constant; nothing holds samples"
                    )
            counts = {_split_rank(shapes[keys[s.name]], s, where) for s in batched}
            if len(counts) != 1:
                raise DataError(f"{where}: inputs hold different numbers of samples")
            (count,) = counts
            if count is None:
                self._index.append((fi, None))
            else:
                self._index.extend((fi, j) for j in range(count))
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._constant = constant or set()
        first = self._arrays(0) if self._constant else {}
        self.constants = {n: np.asarray(first[n]) for n in sorted(self._constant)}

    def __len__(self) -> int:
        return len(self._index)

    def _arrays(self, fi: int) -> dict[str, np.ndarray]:
        if fi in self._cache:
            self._cache.move_to_end(fi)
            return self._cache[fi]
        f = self._files[fi]
        raw = {"": _load_npy(f)} if f.suffix.lower() == ".npy" else _load_npz(f)
        arrays = {name: raw[key] for name, key in self._keys[fi].items()}
        self._cache[fi] = arrays
        if len(self._cache) > self._CACHE_FILES:
            self._cache.popitem(last=False)
        return arrays

    def get(self, index: int) -> dict[str, np.ndarray]:
        fi, j = self._index[index]
        arrays = self._arrays(fi)
        return {
            k: np.asarray(v if j is None else np.take(v, j, axis=self._axes[k]))
            for k, v in arrays.items()
            if k not in self._constant
        }


class ImageFolderSource(IndexedSource):
    """A folder of PNG/JPEG images for a model with one 4-D input; decoded one at a time."""

    def __init__(
        self, folder: Path, files: list[Path], spec: InputSpec, pre: ImagePreprocessing
    ) -> None:
        self.description = f"{folder} ({len(files)} images)"
        self.constants = {}
        if len(spec.shape) != 4:
            raise DataError(
                f"{folder}: images need a model with one 4-D input; input {spec.name!r} is {spec.describe()}"
            )
        channel_axis = 1 if pre.layout == "NCHW" else 3
        channels = spec.shape[channel_axis]
        if channels not in (None, 1, 3):
            raise DataError(
                f"{folder}: input {spec.name!r} {spec.describe()} has {channels} channels at the "
                f"{pre.layout} channel axis; images give 1 or 3 (check --layout)"
            )
        self._channels = channels or 3
        self._files = files
        self._spec = spec
        self._pre = pre
        _require_pillow()

    def __len__(self) -> int:
        return len(self._files)

    def get(self, index: int) -> dict[str, np.ndarray]:
        return {
            self._spec.name: load_image(
                self._files[index], self._pre, self._channels, self._spec.dtype
            )
        }


def _require_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(
            "reading images needs Pillow: pip install 'nbsmt-onnx[images]' (or pip install pillow), "
            "or convert the images to .npy/.npz"
        ) from None
    return Image


def _size(spec: tuple[int, ...], w: int, h: int) -> tuple[int, int]:
    """(width, height) for a resize spec: N = shorter side to N, (H, W) exact."""
    if len(spec) == 2:
        return spec[1], spec[0]
    n = spec[0]
    if w <= h:
        return n, max(1, round(h * n / w))
    return max(1, round(w * n / h)), n


def load_image(path: Path, pre: ImagePreprocessing, channels: int, dtype: np.dtype) -> np.ndarray:
    """Decode and preprocess one image into a sample (no batch axis) of the given layout."""
    image_mod = _require_pillow()
    try:
        with image_mod.open(path) as im:
            # 16-bit grayscale (PNG): Pillow's convert("L") would clip every value above 255
            # to white. Decode as float and divide by 257 so 0..65535 maps onto 0..255, the
            # range --pixel-scale and the mean/std are written for.
            wide = im.mode.startswith("I")
            if wide:
                im = im.convert("I").convert("F") if im.mode != "I" else im.convert("F")
            else:
                im = im.convert("L" if channels == 1 else "RGB")
            if pre.resize is not None:
                im = im.resize(_size(pre.resize, *im.size), resample=image_mod.Resampling.BILINEAR)
            if pre.crop is not None:
                cw, ch = (
                    (pre.crop[0], pre.crop[0]) if len(pre.crop) == 1 else (pre.crop[1], pre.crop[0])
                )
                w, h = im.size
                if cw > w or ch > h:
                    raise DataError(
                        f"{path}: image of {h}x{w} is smaller than the crop {ch}x{cw}; add --resize"
                    )
                left, top = (w - cw) // 2, (h - ch) // 2
                im = im.crop((left, top, left + cw, top + ch))
            pixels = np.asarray(im)
    except DataError:
        raise
    except Exception as err:  # Pillow raises several types for corrupt files
        raise DataError(f"cannot decode image {path}: {err}") from err
    if wide:
        log.debug("%s: 16-bit image, values divided by 257 (0..65535 -> 0..255)", path)
        pixels = pixels.astype(np.float64) / 257.0
        if dtype.kind != "f":
            pixels = np.rint(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] == 1 and channels == 3:
        pixels = np.repeat(pixels, 3, axis=-1)
    if dtype.kind == "f":
        arr = pixels.astype(np.float32) / np.float32(pre.scale)
        mean = np.asarray(
            pre.mean[:channels] if len(pre.mean) >= channels else pre.mean, dtype=np.float32
        )
        std = np.asarray(
            pre.std[:channels] if len(pre.std) >= channels else pre.std, dtype=np.float32
        )
        arr = ((arr - mean) / std).astype(dtype)
    else:
        arr = pixels.astype(dtype)
    if pre.channel_order == "BGR" and channels == 3:
        arr = arr[..., ::-1]
    if pre.layout == "NCHW":
        arr = np.transpose(arr, (2, 0, 1))
    return np.ascontiguousarray(arr)


class RandomSource(IndexedSource):
    """Standard-normal samples (float inputs with static non-batch dims only). Smoke tests only."""

    description = "random (smoke test only)"

    def __init__(self, specs: tuple[InputSpec, ...], count: int, seed: int) -> None:
        for s in specs:
            if s.dtype.kind != "f":
                raise DataError(
                    f"--calib random cannot generate data for {s.dtype} input {s.name!r}; pass real data"
                )
            if not s.shape or any(d is None for d in s.shape[1:]):
                raise DataError(
                    f"--calib random needs static shapes; input {s.name!r} is {s.describe()}; pass real data"
                )
        self._specs = specs
        self._count = count
        self._seed = seed
        self.constants = {}

    def __len__(self) -> int:
        return self._count

    def get(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self._seed, index])
        return {
            s.name: rng.standard_normal(tuple(int(d) for d in s.shape[1:] if d is not None)).astype(
                s.dtype
            )
            for s in self._specs
        }


# --------------------------------------------------------------------------- the data object


class CalibrationData:
    """A re-iterable stream of validated batches (feed dicts) drawn from one source.

    Every call of :meth:`batches` yields the same batches in the same order.
    """

    def __init__(
        self,
        specs: tuple[InputSpec, ...],
        *,
        source: IndexedSource | None = None,
        feeds: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
        num_samples: int,
        batch_size: int,
        seed: int,
        description: str,
        is_random: bool = False,
        order: Sequence[int] | None = None,
    ) -> None:
        if (source is None) == (feeds is None):
            raise ConfigError("CalibrationData needs exactly one of source= or feeds=")
        constants = dict(getattr(source, "constants", None) or {}) if source is not None else {}
        specs = tuple(replace(s, batch_axis=None) if s.name in constants else s for s in specs)
        self.specs = specs
        self.description = description
        self.is_random = is_random
        self._source = source
        self._feeds = feeds
        self.requested_samples = num_samples
        self.seed = seed
        self._constants: Feed = {}
        if source is not None:
            check = _Validator(specs, f"calibration data {description}")
            for s in specs:
                if s.batch_axis is None and s.name not in constants:
                    raise DataError(
                        f"calibration data {description}: input {s.name!r} is constant "
                        f"(same value for every sample) but the data has no array for it; store "
                        f"one of shape {_fmt_shape_spec(s.shape)} under its name or pass "
                        f"--constant {s.name}=FILE.npy"
                    )
                if s.batch_axis is None:
                    self._constants[s.name] = check.constant(s, constants[s.name])
            total = len(source)
            if total == 0:
                raise DataError(f"calibration data {description} holds no samples")
            if order is not None:  # an explicit selection (see split())
                drawn = np.asarray(order, dtype=np.int64)
            elif num_samples < total:
                drawn = np.random.default_rng(seed).permutation(total)[:num_samples]
            else:
                if num_samples > total:
                    log.warning(
                        "calibration data has %d samples, fewer than the %d to draw "
                        "(--num-samples): using all %d",
                        total,
                        num_samples,
                        total,
                    )
                drawn = np.random.default_rng(seed).permutation(total)
            batched = [s for s in specs if s.batch_axis is not None]
            fixed = {s.fixed_batch for s in batched}
            if len(fixed) != 1:
                raise DataError(
                    "model inputs disagree on the batch dimension: "
                    + ", ".join(f"{s.name} {s.describe()}" for s in batched)
                    + "; declare inputs that are the same for every sample with --constant NAME "
                    "and ones batched along another axis with --batch-axis NAME=AXIS"
                )
            (model_batch,) = fixed
            if model_batch is not None:
                if model_batch != batch_size:
                    log.info(
                        "model has a fixed batch size of %d; batching by %d",
                        model_batch,
                        model_batch,
                    )
                batch_size = model_batch
                usable = len(drawn) - len(drawn) % batch_size
                if usable == 0:
                    raise DataError(
                        f"the model's fixed batch size is {batch_size} but only {len(drawn)} samples are available"
                    )
                if usable != len(drawn):
                    log.warning(
                        "dropping %d sample(s) that do not fill a batch of %d",
                        len(drawn) - usable,
                        batch_size,
                    )
                drawn = drawn[:usable]
            self._order = [int(i) for i in drawn]
            self.batch_size = batch_size
            self.num_samples = len(self._order)
            self.num_batches: int | None = -(-self.num_samples // batch_size)
        else:
            self._order = []
            self.batch_size = batch_size
            self.num_samples = num_samples
            self.num_batches = None

    @property
    def default_layout(self) -> bool:
        """True when every input holds its samples along axis 0 (no constants, no other axes)."""
        return all(s.batch_axis == 0 for s in self.specs)

    @property
    def constants(self) -> Feed:
        """The inputs fed unchanged with every batch (validated arrays)."""
        return dict(self._constants)

    @property
    def source(self) -> IndexedSource | None:
        """The indexed source the samples are drawn from (``len(source)`` is its size).

        None for feed iterables, which have no addressable samples. Read-only:
        callers use it to map samples back to per-source data such as labels.
        """
        return self._source

    @property
    def indices(self) -> tuple[int, ...] | None:
        """The source index of each sample, in batch order (None for feed iterables).

        ``indices[k]`` is the source sample at position ``k`` of the
        concatenated batches, i.e. the seeded draw of ``num_samples``.
        """
        return tuple(self._order) if self._source is not None else None

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[Feed]:
        """Yield validated feed dicts (float data cast to the model's float type).

        ``start`` / ``stop`` select batches ``start`` .. ``stop - 1`` (all by
        default): an indexed source reads only their samples, so workers can
        each take a contiguous run of batches of the same seeded draw.
        """
        validator = _Validator(
            self.specs,
            f"calibration data {self.description}",
            images=isinstance(self._source, ImageFolderSource),
        )
        if self._source is not None:
            batched = [s for s in self.specs if s.batch_axis is not None]
            end = len(self._order) if stop is None else min(len(self._order), stop * self.batch_size)
            for offset in range(start * self.batch_size, end, self.batch_size):
                chunk = self._order[offset : min(offset + self.batch_size, end)]
                samples = [validator.sample(self._source.get(i), i) for i in chunk]
                stacked = {
                    s.name: np.stack([smp[s.name] for smp in samples], axis=s.batch_axis or 0)
                    for s in batched
                }
                stacked.update(self._constants)
                yield {s.name: stacked[s.name] for s in self.specs}
            return
        assert self._feeds is not None
        seen = 0
        for i, feed in enumerate(self._feeds()):
            if seen >= self.num_samples or (stop is not None and i >= stop):
                break
            if not isinstance(feed, Mapping):
                raise DataError(
                    f"calibration feed {i} is a {type(feed).__name__}; expected a dict of input name -> array"
                )
            checked = validator.feed(feed, i)
            seen += _feed_count(checked, self.specs)
            if i >= start:
                yield checked
        if seen == 0:
            raise DataError("calibration data yielded no feeds")

    def split(self, fraction: float, seed: int) -> tuple[CalibrationData, CalibrationData] | None:
        """A seeded split of these samples into (estimation, held-out) parts.

        The held-out part gets ``round(fraction * num_samples)`` samples (at least
        one, rounded down to whole batches for a model with a fixed batch size),
        the estimation part the rest, both in this data's batch order. None when
        the data has no addressable samples (feed iterables) or too few to split.
        """
        if self._source is None or not 0.0 < fraction < 1.0:
            return None
        n = len(self._order)
        step = self.batch_size if any(s.fixed_batch is not None for s in self.specs) else 1
        held = max(1, round(fraction * n)) // step * step
        if held == 0 or n - held < step:
            return None
        picked = np.sort(np.random.default_rng(seed).permutation(n)[:held])
        mask = np.zeros(n, dtype=bool)
        mask[picked] = True
        parts = []
        for keep, what in ((~mask, "estimation"), (mask, "held-out")):
            order = [i for i, k in zip(self._order, keep, strict=True) if k]
            parts.append(
                CalibrationData(
                    self.specs,
                    source=self._source,
                    num_samples=len(order),
                    batch_size=self.batch_size,
                    seed=self.seed,
                    description=f"{self.description} ({what} part)",
                    is_random=self.is_random,
                    order=order,
                )
            )
        return parts[0], parts[1]

    def regrouped(self, batch_size: int, num_samples: int) -> CalibrationData | None:
        """The first ``num_samples`` samples of this draw, in batches of ``batch_size``.

        The same samples, in the same order, as re-batching :meth:`batches`
        (``rebatch``), but still indexed: the batch count is known and any run
        of batches can be read on its own. None for feed iterables.
        """
        if self._source is None:
            return None
        order = self._order[:num_samples]
        return CalibrationData(
            self.specs,
            source=self._source,
            num_samples=len(order),
            batch_size=batch_size,
            seed=self.seed,
            description=self.description,
            is_random=self.is_random,
            order=order,
        )

    def samples_in(self, feed: Feed) -> int:
        """How many samples one of this data's feeds holds (its batch axis; 1 if none)."""
        return _feed_count(feed, self.specs)

    def first_batch(self) -> Feed:
        """The first batch (validates the data early; used to fail fast)."""
        for batch in self.batches():
            return batch
        raise DataError(f"calibration data {self.description} holds no samples")


def _list_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return arrays, images


def open_calibration_data(
    data: Any,
    specs: tuple[InputSpec, ...],
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    images: ImagePreprocessing | None = None,
    layout: DataLayout | None = None,
) -> CalibrationData:
    """Build :class:`CalibrationData` from a path, ``"random"``, a mapping of arrays or feed dicts.

    ``specs`` come from :func:`model_inputs` (with the layout's batch axes and
    constants); ``layout`` supplies the constant inputs given as ``.npy`` files.
    """
    files = {n: Path(p) for n, p in (layout.constants if layout else ()) if p is not None}
    if not files:
        return _open(data, specs, num_samples, batch_size, seed, images)
    if isinstance(data, CalibrationData) or not isinstance(data, (str, Path, Mapping)):
        raise ConfigError(
            "constant inputs from files apply to array/image data; complete feeds and "
            "CalibrationData objects already hold every input"
        )
    loaded = {}
    for name, path in files.items():
        if path.suffix.lower() != ".npy" or not path.is_file():
            raise DataError(f"constant input {name!r}: {path} is not an .npy file")
        loaded[name] = _load_npy(path, mmap=False)
    opened = _open(
        data, tuple(s for s in specs if s.name not in files), num_samples, batch_size, seed, images
    )
    assert opened.source is not None  # array and image data are indexed sources
    opened.source.constants = {**opened.source.constants, **loaded}
    return CalibrationData(
        specs,
        source=opened.source,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        description=opened.description,
        is_random=opened.is_random,
    )


def _open(
    data: Any,
    specs: tuple[InputSpec, ...],
    num_samples: int,
    batch_size: int,
    seed: int,
    images: ImagePreprocessing | None,
) -> CalibrationData:
    common: dict[str, Any] = {"num_samples": num_samples, "batch_size": batch_size, "seed": seed}
    if isinstance(data, CalibrationData):
        return data
    if isinstance(data, str) and data == RANDOM:
        return CalibrationData(
            specs,
            source=RandomSource(specs, num_samples, seed),
            description="random",
            is_random=True,
            **common,
        )
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise DataError(f"calibration data {path} does not exist")
        if path.is_dir():
            array_files, imgs = _list_files(path)
            if array_files and imgs:
                raise DataError(f"{path} mixes array files and images; keep one kind per folder")
            if array_files:
                return CalibrationData(
                    specs,
                    source=ArrayFolderSource(path, array_files, specs),
                    description=str(path),
                    **common,
                )
            if imgs:
                if len(specs) != 1 or specs[0].batch_axis is None:
                    raise DataError(
                        f"{path}: image folders need a single-input model; the model has {len(specs)} inputs"
                    )
                source = ImageFolderSource(path, imgs, specs[0], images or ImagePreprocessing())
                return CalibrationData(specs, source=source, description=str(path), **common)
            raise DataError(f"{path} contains no .npy/.npz files and no PNG/JPEG images")
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return CalibrationData(
                specs,
                source=ArraySource(_load_npz(path), specs, str(path)),
                description=str(path),
                **common,
            )
        if suffix == ".npy":
            if len(specs) != 1:
                raise DataError(
                    f"{path}: an .npy file holds one array but the model has inputs "
                    f"{', '.join(s.name for s in specs)}; use an .npz keyed by input name"
                )
            arrays = {specs[0].name: _load_npy(path)}
            return CalibrationData(
                specs, source=ArraySource(arrays, specs, str(path)), description=str(path), **common
            )
        if suffix in IMAGE_SUFFIXES:
            raise DataError(f"{path} is a single image; pass the folder that contains the images")
        raise DataError(
            f"unsupported calibration data {path}: give an .npz, an .npy, a folder or 'random'"
        )
    if isinstance(data, Mapping):
        return CalibrationData(
            specs, source=ArraySource(data, specs, "arrays"), description="arrays", **common
        )
    if callable(data):
        return CalibrationData(specs, feeds=data, description="feeds", **common)
    if isinstance(data, Iterable):
        if isinstance(data, (list, tuple)):
            items = data
        else:  # a one-shot iterator: keep what the passes need so it can be replayed
            items = _take_feeds(data, num_samples)
        return CalibrationData(specs, feeds=lambda: items, description="feeds", **common)
    raise DataError(
        f"calibration data of type {type(data).__name__} is not supported: pass a path, 'random', "
        "a dict of arrays or an iterable of feed dicts"
    )


def _feed_count(feed: Feed, specs: tuple[InputSpec, ...]) -> int:
    """Samples in a feed: the size of the first batched input's batch axis (1 if none)."""
    for s in specs:
        if s.batch_axis is not None and s.name in feed and np.ndim(feed[s.name]) > s.batch_axis:
            return int(np.shape(feed[s.name])[s.batch_axis])
    return 1


def _take_feeds(it: Iterable[Any], num_samples: int) -> list[Any]:
    out: list[Any] = []
    seen = 0
    for feed in it:
        out.append(feed)
        if isinstance(feed, Mapping) and feed:
            first = np.asarray(next(iter(feed.values())))
            seen += int(first.shape[0]) if first.ndim else 1
        else:
            seen += 1
        if seen >= num_samples:
            break
    log.info(
        "kept %d feed(s) of a one-shot iterator in memory so every pass can replay them", len(out)
    )
    return out


def feed_samples(feed: Mapping[str, np.ndarray]) -> int | None:
    """Samples in a feed (the common leading dimension), or None when inputs disagree or are scalars."""
    sizes = {int(np.asarray(v).shape[0]) if np.ndim(v) else None for v in feed.values()}
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return size


def rebatch(
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]], batch_size: int, max_samples: int
) -> Callable[[], Iterator[Feed]]:
    """The first ``max_samples`` samples of ``batches()``, regrouped into batches of ``batch_size``.

    Re-iterable like its source (each call reads it again) and deterministic
    when the source is. Holds at most one new batch plus one source batch.
    Every feed must have a common leading (batch) dimension (:func:`feed_samples`).
    """
    if batch_size < 1 or max_samples < 1:
        raise ConfigError(f"rebatch needs positive sizes; got {batch_size}, {max_samples}")

    def take(feed: Mapping[str, np.ndarray], start: int, stop: int) -> Feed:
        return {k: np.asarray(v)[start:stop] for k, v in feed.items()}

    def join(parts: list[Feed]) -> Feed:
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def generate() -> Iterator[Feed]:
        pending: list[Feed] = []
        have = seen = 0
        for feed in batches():
            n = feed_samples(feed)
            if n is None:
                raise DataError(
                    "calibration feeds without a common batch dimension cannot be re-batched"
                )
            n = min(n, max_samples - seen)
            offset = 0
            while offset < n:
                step = min(n - offset, batch_size - have)
                pending.append(take(feed, offset, offset + step))
                have += step
                offset += step
                if have == batch_size:
                    yield join(pending)
                    pending, have = [], 0
            seen += n
            if seen >= max_samples:
                break
        if pending:
            yield join(pending)

    return generate
