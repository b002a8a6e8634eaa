"""Label formats: .npy, CSV (one column / file,label), class folders; errors name the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nbsmt_onnx.calibration.labels import FOLDERS, load_labels
from nbsmt_onnx.errors import DataError


def test_npy_1d_and_column(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.array([3, 1, 2], dtype=np.uint8))
    np.save(tmp_path / "b.npy", np.array([[3], [1], [2]], dtype=np.int64))
    np.save(tmp_path / "c.npy", np.array([3.0, 1.0, 2.0]))
    for name in ("a.npy", "b.npy", "c.npy"):
        labels = load_labels(tmp_path / name, count=3)
        assert labels.values.dtype == np.int64
        assert labels.values.tolist() == [3, 1, 2]


def test_npy_one_hot(tmp_path: Path) -> None:
    np.save(tmp_path / "h.npy", np.eye(4, dtype=np.float32)[[2, 0, 3]])
    assert load_labels(tmp_path / "h.npy", count=3).values.tolist() == [2, 0, 3]


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.array([0.5, 1.0]), "must be integers"),
        (np.array([-1, 2]), "must be >= 0"),
        (np.zeros((2, 2, 2)), "shape"),
    ],
)
def test_npy_bad(tmp_path: Path, array: np.ndarray, match: str) -> None:
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(DataError, match=match):
        load_labels(tmp_path / "x.npy", count=2)


def test_count_mismatch(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(5))
    with pytest.raises(DataError, match="holds 5 labels but the evaluation data has 6 samples"):
        load_labels(tmp_path / "x.npy", count=6)


def test_csv_one_column_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "plain.csv").write_text("4\n0\n9\n")
    (tmp_path / "header.csv").write_text("label\n4\n0\n9\n\n")
    for name in ("plain.csv", "header.csv"):
        assert load_labels(tmp_path / name, count=3).values.tolist() == [4, 0, 9]


def _folder(root: Path, names: list[str]) -> list[Path]:
    files = []
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
        files.append(p)
    return sorted(files)


def test_csv_file_label_by_relative_path_and_bare_name(tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = _folder(data, ["b/x.png", "a/y.png", "z.png"])  # sorted: a/y, b/x, z
    (tmp_path / "l.csv").write_text("file,label\nb/x.png,1\ny.png,7\nz.png,3\n")
    labels = load_labels(tmp_path / "l.csv", count=3, files=files, root=data)
    assert labels.values.tolist() == [7, 1, 3]
    # no header, columns in the other order via header names
    (tmp_path / "m.csv").write_text("label,path\n1,b/x.png\n7,a/y.png\n3,z.png\n")
    assert load_labels(tmp_path / "m.csv", count=3, files=files, root=data).values.tolist() == [
        7,
        1,
        3,
    ]
    (tmp_path / "n.csv").write_text("b/x.png,1\na/y.png,7\nz.png,3\n")
    assert load_labels(tmp_path / "n.csv", count=3, files=files, root=data).values.tolist() == [
        7,
        1,
        3,
    ]


def test_csv_missing_file_and_bad_label(tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = _folder(data, ["a.png", "b.png"])
    (tmp_path / "l.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DataError, match=r"no label for b\.png"):
        load_labels(tmp_path / "l.csv", count=2, files=files, root=data)
    (tmp_path / "bad.csv").write_text("file,label\na.png,cat\nb.png,1\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: label 'cat' is not a non-negative integer"):
        load_labels(tmp_path / "bad.csv", count=2, files=files, root=data)


def test_csv_with_file_names_needs_a_folder(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("a.png,1\n")
    with pytest.raises(DataError, match="names files, but --data is not a folder"):
        load_labels(tmp_path / "l.csv", count=1)


def test_class_folders_numeric_names_use_the_number(tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = _folder(data, ["10/a.png", "2/b.png", "0/c.png"])  # sorted paths: 0/c, 10/a, 2/b
    labels = load_labels(FOLDERS, count=3, files=files, root=data)
    assert labels.values.tolist() == [0, 10, 2]


def test_class_folders_names_in_sorted_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = _folder(data, ["dog/1.png", "cat/2.png", "cat/3.png", "emu/x/4.png"])
    labels = load_labels(FOLDERS, count=4, files=files, root=data)
    assert labels.class_names == ("cat", "dog", "emu")
    assert labels.values.tolist() == [0, 0, 1, 2]


def test_class_folders_errors(tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = _folder(data, ["cat/1.png", "loose.png"])
    with pytest.raises(DataError, match="not inside a class sub-folder"):
        load_labels(FOLDERS, count=2, files=files, root=data)
    with pytest.raises(DataError, match="needs --data to be a folder"):
        load_labels(FOLDERS, count=2)
    with pytest.raises(DataError, match="one sample per file"):
        load_labels(FOLDERS, count=5, files=files, root=data)


def test_unsupported_and_missing(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text("[]")
    with pytest.raises(DataError, match="unsupported format"):
        load_labels(tmp_path / "l.json", count=1)
    with pytest.raises(DataError, match="does not exist"):
        load_labels(tmp_path / "nope.npy", count=1)


def test_array_labels_from_the_api() -> None:
    assert load_labels([1, 2, 3], count=3).values.tolist() == [1, 2, 3]
