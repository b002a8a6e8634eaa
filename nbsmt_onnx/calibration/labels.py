"""Class labels of evaluation data: a ``.npy`` array, a CSV file, or class folders.

Labels are integers ``0..classes-1`` matching the model's output index.
They are resolved to one label per *sample of the evaluation source*, in the
source's own order (the order ``calibration.data`` indexes it: the arrays'
axis 0, or the sorted file list of a folder), so a seeded subset of the data
picks its labels by index.

Formats:

- ``.npy``: an integer array ``[N]`` (or ``[N, 1]``), or a one-hot /
  probability array ``[N, classes]`` (the argmax of each row is the label).
- CSV: one column of integers (one label per sample, in order), or two columns
  ``file,label`` naming each file of a data folder relative to the folder
  (or by its bare name when that is unique). A first row whose label field is
  not an integer is a header; with a header, the columns named ``label``
  (or ``class``/``target``) and ``file`` (or ``filename``/``path``/``image``)
  are used.
- ``"folders"``: the data is a folder of class sub-folders (``data/cat/1.png``):
  the label of a file is its first-level sub-folder. Sub-folders named by
  integers (``0``, ``1``, ..., ``10``) use that number; otherwise they are
  numbered in sorted name order (the ImageNet synset-folder convention).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nbsmt_onnx.errors import DataError

log = logging.getLogger(__name__)

FOLDERS = "folders"
_LABEL_COLUMNS = ("label", "class", "target")
_FILE_COLUMNS = ("file", "filename", "path", "image")


@dataclass(frozen=True)
class Labels:
    """One integer label per sample of the evaluation source, plus where they came from."""

    values: np.ndarray  # int64 [count]
    description: str
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])


def _as_int_labels(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        if arr.dtype.kind not in "fiub":
            raise DataError(f"{where}: label array of dtype {arr.dtype} is not numeric")
        return np.argmax(arr, axis=1).astype(np.int64)
    if arr.ndim != 1:
        raise DataError(
            f"{where}: labels must have shape [N], [N, 1] or [N, classes]; got {tuple(arr.shape)}"
        )
    if arr.dtype.kind in "iub":
        out = arr.astype(np.int64)
    elif arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        out = arr.astype(np.int64)
    else:
        raise DataError(f"{where}: labels must be integers; got dtype {arr.dtype}")
    if out.size and int(out.min()) < 0:
        raise DataError(f"{where}: labels must be >= 0; found {int(out.min())}")
    return out


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read labels {path}: {err}") from err
    return _as_int_labels(np.asarray(arr), str(path))


def _is_int(text: str) -> bool:
    try:
        int(text.strip())
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> tuple[list[str] | None, list[int]]:
    """``(file names or None, labels)`` from a 1- or 2-column CSV (see the module doc)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read labels {path}: {err}") from err
    if not rows:
        raise DataError(f"labels {path} is empty")
    header = None
    first = rows[0]
    label_col = 0 if len(first) == 1 else 1
    if not _is_int(first[label_col]):
        header = [c.strip().lower() for c in first]
        rows = rows[1:]
        label_col = next((header.index(c) for c in _LABEL_COLUMNS if c in header), -1)
        if label_col < 0:
            if len(header) == 1:
                label_col = 0
            else:
                raise DataError(
                    f"{path}: header {first} has no label column; name it one of {', '.join(_LABEL_COLUMNS)}"
                )
    file_col: int | None = None
    if header is not None:
        file_col = next((header.index(c) for c in _FILE_COLUMNS if c in header), None)
        if file_col is None and len(header) > 1:
            file_col = 0 if label_col != 0 else None
    elif len(first) >= 2:
        file_col = 0
    names: list[str] | None = [] if file_col is not None else None
    labels: list[int] = []
    for lineno, row in enumerate(rows, start=2 if header else 1):
        if len(row) <= max(label_col, file_col or 0):
            raise DataError(f"{path}:{lineno}: expected {len(first)} columns; got {len(row)}")
        text = row[label_col].strip()
        if not _is_int(text) or int(text) < 0:
            raise DataError(
                f"{path}:{lineno}: label {text!r} is not a non-negative integer class index"
            )
        labels.append(int(text))
        if names is not None and file_col is not None:
            names.append(row[file_col].strip())
    if not labels:
        raise DataError(f"labels {path} holds no rows")
    return names, labels


def _by_file(
    names: list[str], labels: list[int], files: Sequence[Path], root: Path, where: str
) -> np.ndarray:
    """Order labels given per file name like the data folder's sorted file list."""
    table: dict[str, int] = {}
    for name, label in zip(names, labels, strict=True):
        key = Path(name).as_posix()
        if key in table and table[key] != label:
            raise DataError(f"{where}: file {name!r} is listed twice with different labels")
        table[key] = label
    rel = [f.relative_to(root).as_posix() for f in files]
    bare_counts: dict[str, int] = {}
    for r in rel:
        bare_counts[Path(r).name] = bare_counts.get(Path(r).name, 0) + 1
    out = np.empty(len(files), dtype=np.int64)
    missing = []
    for i, r in enumerate(rel):
        if r in table:
            out[i] = table[r]
        elif bare_counts[Path(r).name] == 1 and Path(r).name in table:
            out[i] = table[Path(r).name]
        else:
            missing.append(r)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(
            f"{where}: no label for {', '.join(missing[:3])}{more}; list every data file "
            "(path relative to the data folder)"
        )
    return out


def _from_folders(files: Sequence[Path], root: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    per_file = []
    for f in files:
        parts = f.relative_to(root).parts
        if len(parts) < 2:
            raise DataError(
                f"--labels {FOLDERS}: {f} is not inside a class sub-folder of {root}; "
                "put every file in <data>/<class>/"
            )
        per_file.append(parts[0])
    classes = sorted(set(per_file))
    if all(c.isdigit() for c in classes):
        index = {c: int(c) for c in classes}
        names = tuple(sorted(classes, key=int))
    else:
        index = {c: i for i, c in enumerate(classes)}
        names = tuple(classes)
        log.info(
            "class folders numbered in sorted order: %s",
            ", ".join(f"{i}={c}" for c, i in list(index.items())[:10])
            + (" ..." if len(index) > 10 else ""),
        )
    return np.asarray([index[c] for c in per_file], dtype=np.int64), names


def load_labels(
    labels: Any,
    *,
    count: int,
    files: Sequence[Path] | None = None,
    root: Path | None = None,
) -> Labels:
    """Resolve ``labels`` to one label per sample of an evaluation source of ``count`` samples.

    ``labels``: a path (``.npy`` or ``.csv``), :data:`FOLDERS`, or an array-like.
    ``files`` / ``root``: the data folder's files (sorted, one sample each) and
    the folder, when the data is a folder; needed by ``file,label`` CSVs and
    :data:`FOLDERS`.
    """
    if isinstance(labels, str) and labels == FOLDERS:
        if files is None or root is None:
            raise DataError(f"--labels {FOLDERS} needs --data to be a folder of class sub-folders")
        if len(files) != count:
            raise DataError(
                f"--labels {FOLDERS}: the data folder's {len(files)} files hold {count} samples; "
                "class folders need one sample per file"
            )
        values, class_names = _from_folders(files, root)
        return Labels(values, f"class folders of {root}", class_names)
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.is_file():
            raise DataError(
                f"labels {path} does not exist (give an .npy or .csv file, or 'folders')"
            )
        suffix = path.suffix.lower()
        if suffix == ".npy":
            values = _read_npy(path)
        elif suffix in (".csv", ".txt"):
            file_names, ints = _read_csv(path)
            if file_names is not None:
                if files is None or root is None:
                    raise DataError(
                        f"{path} names files, but --data is not a folder; use a one-column CSV "
                        "(one label per sample, in order)"
                    )
                if len(files) != count:
                    raise DataError(
                        f"{path} names files, but the data folder's {len(files)} files hold {count} "
                        "samples; use a one-column CSV (one label per sample, in order)"
                    )
                return Labels(_by_file(file_names, ints, files, root, str(path)), str(path))
            values = np.asarray(ints, dtype=np.int64)
        else:
            raise DataError(f"labels {path}: unsupported format; give an .npy or .csv file")
        description = str(path)
    else:
        try:
            values = _as_int_labels(np.asarray(labels), "labels")
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"labels of type {type(labels).__name__} are not supported") from err
        description = "array"
    if values.shape[0] != count:
        raise DataError(
            f"{description} holds {values.shape[0]} labels but the evaluation data has {count} "
            "samples; give one label per sample"
        )
    return Labels(values, description)


__all__ = ["FOLDERS", "Labels", "load_labels"]
