"""Per-input data layout: batch axes other than 0, constant inputs (declared, detected, scalars)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nbsmt_onnx.calibration.data import InputSpec, model_inputs, open_calibration_data
from nbsmt_onnx.config import DataLayout
from nbsmt_onnx.errors import ConfigError, DataError

F32 = np.dtype(np.float32)
X = InputSpec("x", F32, (None, 6))
STATE = InputSpec("state", F32, (2, None, 4))
FIXED = InputSpec("c", F32, (1, 6))
SCALAR = InputSpec("s", F32, ())


def _data(n: int = 10) -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    return {
        "x": r.standard_normal((n, 6)).astype(np.float32),
        "state": r.standard_normal((2, n, 4)).astype(np.float32),
        "c": r.standard_normal((1, 6)).astype(np.float32),
        "s": np.float32(3.0),
    }


def _open(arrays, specs, **kw):  # type: ignore[no-untyped-def]
    return open_calibration_data(arrays, specs, num_samples=10, batch_size=4, seed=0, **kw)


def test_batch_axis_one_slices_and_stacks_along_that_axis() -> None:
    arrays = _data()
    state = InputSpec("state", F32, (2, None, 4), batch_axis=1)
    data = _open(arrays, (X, state))
    batches = list(data.batches())
    assert [b["state"].shape for b in batches] == [(2, 4, 4), (2, 4, 4), (2, 2, 4)]
    order = list(data.indices or ())
    # Sample k of the draw is x[order[k]] and state[:, order[k], :], kept together.
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), arrays["x"][order])
    np.testing.assert_array_equal(
        np.concatenate([b["state"] for b in batches], axis=1), arrays["state"][:, order, :]
    )
    assert not data.default_layout


def test_scalar_and_exact_shape_inputs_are_constants_fed_with_every_batch() -> None:
    arrays = _data()
    data = _open(arrays, (X, FIXED, SCALAR))
    assert set(data.constants) == {"c", "s"}  # c detected (its shape is the input's), s a scalar
    for batch in data.batches():
        np.testing.assert_array_equal(batch["c"], arrays["c"])
        assert batch["s"].shape == () and float(batch["s"]) == 3.0
    assert sum(len(b["x"]) for b in data.batches()) == 10


def test_declared_constant_from_file(tmp_path: Path) -> None:
    arrays = _data()
    np.save(tmp_path / "c.npy", arrays.pop("c"))
    layout = DataLayout(constants={"c": str(tmp_path / "c.npy")})
    specs = (X, InputSpec("c", F32, (1, 6), batch_axis=None))
    data = _open({"x": arrays["x"]}, specs, layout=layout)
    np.testing.assert_array_equal(data.first_batch()["c"], np.load(tmp_path / "c.npy"))


def test_constant_with_a_wrong_shape_names_the_input() -> None:
    arrays = _data()
    arrays["c"] = np.zeros((2, 6), np.float32)
    specs = (X, InputSpec("c", F32, (1, 6), batch_axis=None))
    with pytest.raises(
        DataError, match=r"input 'c' constant 0 has shape \(2, 6\); the model expects \(1, 6\)"
    ):
        _open(arrays, specs)


def test_without_a_layout_a_state_input_gets_a_hint() -> None:
    arrays = _data()
    with pytest.raises(DataError, match="--batch-axis NAME=AXIS"):
        _open({"x": arrays["x"], "state": arrays["state"]}, (X, STATE))


def test_model_inputs_apply_the_layout_and_check_names_and_axes() -> None:
    import transform_models as tm
    from onnx import helper

    model = tm.make_model(
        [
            helper.make_node("Add", ["x", "c"], ["xc"]),
            helper.make_node("Mul", ["xc", "s"], ["y"]),
        ],
        [tm.value("x", ["N", 6]), tm.value("c", [1, 6]), tm.value("s", [])],
        [tm.value("y", ["N", 6])],
    )
    specs = {s.name: s for s in model_inputs(model, DataLayout(constants={"c": None}))}
    assert specs["x"].batch_axis == 0 and specs["c"].batch_axis is None
    assert specs["s"].batch_axis is None  # scalars are always constant
    with pytest.raises(ConfigError, match="unknown input"):
        model_inputs(model, DataLayout(batch_axes={"nope": 1}))
    with pytest.raises(ConfigError, match="out of range"):
        model_inputs(model, DataLayout(batch_axes={"x": 2}))
    with pytest.raises(ConfigError, match="both constant and with a batch axis"):
        DataLayout(batch_axes={"c": 0}, constants={"c": None})
    with pytest.raises(ConfigError, match="non-negative"):
        DataLayout(batch_axes={"x": -1})


def test_folder_of_files_with_a_constant_and_a_batch_axis(tmp_path: Path) -> None:
    arrays = _data(6)
    for i in range(3):
        np.savez(
            tmp_path / f"part{i}.npz",
            x=arrays["x"][2 * i : 2 * i + 2],
            state=arrays["state"][:, 2 * i : 2 * i + 2],
            c=arrays["c"],
        )
    state = InputSpec("state", F32, (2, None, 4), batch_axis=1)
    data = open_calibration_data(tmp_path, (X, state, FIXED), num_samples=6, batch_size=6, seed=0)
    (batch,) = list(data.batches())
    order = list(data.indices or ())
    np.testing.assert_array_equal(batch["state"], arrays["state"][:, order, :])
    np.testing.assert_array_equal(batch["c"], arrays["c"])


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_is_scaled_not_clipped(tmp_path: Path, channels: int) -> None:
    from PIL import Image

    from nbsmt_onnx.calibration.data import load_image
    from nbsmt_onnx.config import ImagePreprocessing

    values = np.array([[0, 257, 30000], [40000, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # the case being tested: a 16-bit grayscale PNG
    got = load_image(tmp_path / "deep.png", ImagePreprocessing(), channels, F32)
    # 0..65535 -> 0..255 (divide by 257), then the default --pixel-scale 255: 0..1.
    want = (values.astype(np.float64) / 257.0 / 255.0).astype(np.float32)
    assert got.shape == (channels, 2, 3)
    for c in range(channels):
        np.testing.assert_allclose(got[c], want, rtol=0, atol=1e-6)  # float32 rounding of 0..1
    assert 0.4 < float(got[0, 0, 2]) < 0.5  # 30000 is not clipped to white (1.0)
