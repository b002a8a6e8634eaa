"""Calibration data sources: formats, seeded sampling, batching, validation messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transform_models as tm

from nbsmt_onnx.calibration.data import InputSpec, model_inputs, open_calibration_data
from nbsmt_onnx.config import ImagePreprocessing
from nbsmt_onnx.errors import DataError

SPEC = (InputSpec("x", np.dtype(np.float32), (None, 3, 4, 4)),)


def _open(data, specs=SPEC, n=100, bs=4, seed=0, **kw):  # type: ignore[no-untyped-def]
    return open_calibration_data(data, specs, num_samples=n, batch_size=bs, seed=seed, **kw)


def _all(data) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([b["x"] for b in data.batches()])


def _stack(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def test_model_inputs_skip_initializers() -> None:
    model = tm.matmul_chain()
    from onnx import TensorProto, helper

    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [6, 5]))
    (spec,) = model_inputs(model)
    assert spec.name == "x" and spec.shape == (None, 6) and spec.describe() == "(N, 6)"


def test_npz_keyed_sampling_is_seeded_and_complete(tmp_path: Path) -> None:
    arr = _stack(10)
    np.savez(tmp_path / "c.npz", x=arr)
    data = _open(tmp_path / "c.npz", n=6, bs=4, seed=1)
    assert data.num_samples == 6 and data.num_batches == 2
    got = _all(data)
    assert got.shape == (6, 3, 4, 4)
    np.testing.assert_array_equal(got, _all(data))  # re-iterable, same order
    order = np.random.default_rng(1).permutation(10)[:6]
    np.testing.assert_array_equal(got, arr[order])
    other = _all(_open(tmp_path / "c.npz", n=6, seed=2))
    assert not np.array_equal(got, other)
    # all samples when asking for more than there are
    np.testing.assert_array_equal(
        np.sort(_all(_open(tmp_path / "c.npz", n=50)).ravel()), np.sort(arr.ravel())
    )


def test_source_and_indices_map_samples_to_the_source(tmp_path: Path) -> None:
    """Public read-only ``source`` / ``indices``: sample k of the batches is source[indices[k]]."""
    arr = _stack(10)
    np.savez(tmp_path / "c.npz", x=arr)
    data = _open(tmp_path / "c.npz", n=7, bs=3, seed=4)
    assert data.source is not None and len(data.source) == 10
    assert data.indices is not None and len(data.indices) == data.num_samples == 7
    assert list(data.indices) == [int(i) for i in np.random.default_rng(4).permutation(10)[:7]]
    np.testing.assert_array_equal(_all(data), arr[list(data.indices)])
    for k, i in enumerate(data.indices):
        np.testing.assert_array_equal(data.source.get(i)["x"], arr[i], err_msg=str(k))
    with pytest.raises(AttributeError):
        data.indices = (0,)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        data.source = None  # type: ignore[misc]
    # the model's fixed batch drops the remainder: indices follow
    fixed = (InputSpec("x", np.dtype(np.float32), (2, 3, 4, 4)),)
    data = _open({"x": arr}, fixed, n=5, seed=0)
    assert data.indices is not None and len(data.indices) == 4 and len(data.source) == 10  # type: ignore[arg-type]
    # feed iterables have no addressable samples
    feeds = _open([{"x": _stack(2)}])
    assert feeds.source is None and feeds.indices is None


def test_unkeyed_npy_and_savez_positional(tmp_path: Path) -> None:
    arr = _stack(5)
    np.save(tmp_path / "c.npy", arr)
    assert _all(_open(tmp_path / "c.npy")).shape == (5, 3, 4, 4)
    np.savez(tmp_path / "p.npz", arr)  # key arr_0
    assert _all(_open(tmp_path / "p.npz")).shape == (5, 3, 4, 4)


def test_npy_for_multi_input_model_is_refused(tmp_path: Path) -> None:
    specs = (SPEC[0], InputSpec("y", np.dtype(np.float32), (None, 2)))
    np.save(tmp_path / "c.npy", _stack(2))
    with pytest.raises(
        DataError, match=r"an \.npy file holds one array but the model has inputs x, y"
    ):
        _open(tmp_path / "c.npy", specs)


def test_folder_of_single_samples_and_stacks(tmp_path: Path) -> None:
    folder = tmp_path / "arrays"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"s{i}.npy", _stack(1, seed=i)[0])  # one sample, no batch axis
    np.savez(folder / "stack.npz", x=_stack(4, seed=9))  # four samples
    data = _open(folder, n=100, bs=3)
    assert data.num_samples == 7
    assert _all(data).shape == (7, 3, 4, 4)


def test_wrong_names_dtype_shape_messages(tmp_path: Path) -> None:
    np.savez(tmp_path / "names.npz", input=_stack(2), other=_stack(2))
    with pytest.raises(
        DataError, match=r"no array for model input\(s\) x; the file has input, other"
    ):
        _open(tmp_path / "names.npz")
    with pytest.raises(
        DataError, match=r"input 'x' sample \d has dtype int32; the model expects float32"
    ):
        _open({"x": np.zeros((2, 3, 4, 4), np.int32)}).first_batch()
    with pytest.raises(
        DataError, match=r"input 'x' sample \d has shape \(3, 5, 4\); the model expects \(3, 4, 4\)"
    ):
        _open({"x": np.zeros((2, 3, 5, 4), np.float32)}).first_batch()
    with pytest.raises(DataError, match=r"array for input 'x' has shape \(4, 4\)"):
        _open({"x": np.zeros((4, 4), np.float32)})


def test_nan_and_inf_name_input_and_sample(tmp_path: Path) -> None:
    arr = _stack(6)
    arr[4, 1, 2, 3] = np.nan
    data = _open({"x": arr}, n=6, bs=6)
    with pytest.raises(DataError, match=r"input 'x' sample 4 contains NaN"):
        data.first_batch()
    arr[4, 1, 2, 3] = np.inf
    with pytest.raises(DataError, match=r"input 'x' sample 4 contains Inf"):
        _open({"x": arr}, n=6, bs=6).first_batch()


def test_float64_is_cast_but_int_is_not() -> None:
    data = _open({"x": _stack(2).astype(np.float64)})
    assert data.first_batch()["x"].dtype == np.float32


def test_fixed_model_batch_wins_and_drops_remainder() -> None:
    specs = (InputSpec("x", np.dtype(np.float32), (2, 3, 4, 4)),)
    data = _open({"x": _stack(5)}, specs, n=5, bs=16)
    assert data.batch_size == 2 and data.num_samples == 4
    assert [b["x"].shape[0] for b in data.batches()] == [2, 2]


def test_feed_iterables_generators_and_callables() -> None:
    feeds = [{"x": _stack(3, seed=i)} for i in range(4)]
    data = _open(feeds, n=6)
    assert [b["x"].shape[0] for b in data.batches()] == [3, 3]  # stops once 6 samples are reached
    gen = (f for f in feeds)  # one-shot: kept so it can be replayed
    data = _open(gen, n=100)
    assert len(list(data.batches())) == 4 and len(list(data.batches())) == 4
    data = _open(lambda: iter(feeds[:2]), n=100)
    assert len(list(data.batches())) == 2
    with pytest.raises(DataError, match=r"feed 0: missing input\(s\) x; unknown input\(s\) y"):
        _open([{"y": _stack(1)}]).first_batch()


def test_random_needs_static_float_shapes() -> None:
    data = _open("random", n=5, bs=2)
    assert data.is_random and _all(data).shape == (5, 3, 4, 4)
    np.testing.assert_array_equal(_all(data), _all(_open("random", n=5, bs=2)))
    dynamic = (InputSpec("x", np.dtype(np.float32), (None, 3, None, None)),)
    with pytest.raises(DataError, match="--calib random needs static shapes"):
        _open("random", dynamic)


def test_missing_and_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _open(tmp_path / "nope.npz")
    (tmp_path / "c.txt").write_text("1 2 3")
    with pytest.raises(DataError, match="unsupported calibration data"):
        _open(tmp_path / "c.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"contains no \.npy/\.npz files and no PNG/JPEG images"):
        _open(tmp_path / "empty")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        _open(tmp_path / "broken.npz")


def test_image_folder_preprocessing(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    (folder / "class_a").mkdir(parents=True)
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[:, 10:, 1] = 128
    image.fromarray(rgb).save(folder / "class_a" / "a.png")
    red = np.zeros((10, 20, 3), dtype=np.uint8)
    red[..., 0] = 255  # uniform, so JPEG's chroma subsampling keeps it red
    image.fromarray(red).save(folder / "b.jpg", quality=100)
    spec = (InputSpec("x", np.dtype(np.float32), (None, 3, 4, 4)),)
    pre = ImagePreprocessing(resize=(4,), crop=(4,), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = _open(folder, spec, images=pre)
    batch = data.first_batch()["x"]
    assert batch.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(
        batch[:, 0], 1.0, atol=0.02
    )  # red channel 255 -> (1 - .5) / .5; JPEG tolerance
    bgr = _open(
        folder, spec, images=ImagePreprocessing(resize=(4,), crop=(4,), channel_order="BGR")
    )
    np.testing.assert_allclose(bgr.first_batch()["x"][:, 2], 1.0, atol=0.01)  # red is now last
    nhwc = (InputSpec("x", np.dtype(np.float32), (None, 4, 4, 3)),)
    assert _open(
        folder, nhwc, images=ImagePreprocessing(resize=(4, 4), layout="NHWC")
    ).first_batch()["x"].shape == (2, 4, 4, 3)
    with pytest.raises(
        DataError, match=r"has shape \(3, 10, 20\); the model expects \(3, 4, 4\) \(resize images"
    ):
        _open(folder, spec).first_batch()
    gray = (InputSpec("x", np.dtype(np.float32), (None, 1, 4, 4)),)
    assert _open(folder, gray, images=ImagePreprocessing(resize=(4, 4))).first_batch()[
        "x"
    ].shape == (2, 1, 4, 4)
    (folder / "c.png").write_bytes(b"broken png")
    with pytest.raises(DataError, match="cannot decode image"):
        list(_open(folder, spec, images=pre).batches())
