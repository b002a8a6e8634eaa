"""The NumPy reference of the NB-SMT ops against hand-computed values and independent paths.

No C++ library needed. The expectations here are computed by hand from docs/spec.md
§2-§3 (shown in comments) or by code paths that share nothing with the
reference's packing and reduction (a plain Python loop over the rules, plain
int8 arithmetic, the ``onnx.reference`` standard Conv).
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference
import pytest
from onnx import TensorProto, helper, numpy_helper

from nbsmt_onnx.errors import ModelError, UnsupportedModelError
from nbsmt_onnx.ops import onnx_schema, schema
from nbsmt_onnx.ops import reference as ref

# ----------------------------------------------------------------------------- R


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (15, 15),  # below 16: kept
        (16, 16),
        (24, 32),  # 1.5 -> 2 (half to even)
        (40, 32),  # 2.5 -> 2 (half to even)
        (56, 64),  # 3.5 -> 4
        (100, 96),  # 6.25 -> 6
        (200, 192),  # 12.5 -> 12
        (247, 240),  # 15.4375 -> 15
        (248, 240),  # 15.5 -> 16 -> clipped to 15
        (255, 240),  # 15.9375 -> 16 -> clipped to 15
    ],
)
def test_reduce_unsigned_by_hand(value: int, expected: int) -> None:
    assert int(ref.reduce_operand(value, signed=False)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (7, 7),  # inside [-8, 7]: kept
        (-8, -8),
        (8, 0),  # 0.5 -> 0
        (-9, -16),  # -0.5625 -> -1
        (24, 32),  # 1.5 -> 2
        (-24, -32),  # -1.5 -> -2
        (-40, -32),  # -2.5 -> -2
        (60, 64),  # 3.75 -> 4
        (-100, -96),  # -6.25 -> -6
        (119, 112),  # 7.4375 -> 7
        (120, 112),  # 7.5 -> 8 -> clipped to 7
        (127, 112),  # 7.9375 -> 8 -> clipped to 7
        (-127, -128),  # -7.9375 -> -8
    ],
)
def test_reduce_signed_by_hand(value: int, expected: int) -> None:
    assert int(ref.reduce_operand(value, signed=True)) == expected


def test_reduce_matches_rule_on_every_8bit_value() -> None:
    # The rule, spelled out with Python's round() (half to even) on exact fractions.
    for v in range(0, 256):
        want = v if v < 16 else min(max(round(v / 16), 0), 15) * 16
        assert int(ref.reduce_operand(v, signed=False)) == want, v
    for v in range(-127, 128):
        want = v if -8 <= v <= 7 else min(max(round(v / 16), -8), 7) * 16
        assert int(ref.reduce_operand(v, signed=True)) == want, v


# ----------------------------------------------------------------------------- quantization


def test_quantize_activations_half_even_and_clip() -> None:
    # scale 1: x / 1 is exact, so only rounding and clipping act
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 254.5, 255.5, 300.0, -3.0, 126.5, 127.5], np.float32)
    unsigned = ref.quantize_activations(x, 1.0, act_signed=False)
    signed = ref.quantize_activations(x, 1.0, act_signed=True)
    assert unsigned.tolist() == [0, 2, 2, 0, 0, 254, 255, 255, 0, 126, 128]  # 127.5 -> 128 (even)
    assert signed.tolist() == [0, 2, 2, 0, -2, 127, 127, 127, -3, 126, 127]


def test_quantize_activations_nan_and_inf() -> None:
    x = np.array([np.nan, np.inf, -np.inf, -np.nan], np.float32)
    assert ref.quantize_activations(x, 0.5, act_signed=False).tolist() == [0, 255, 0, 0]
    assert ref.quantize_activations(x, 0.5, act_signed=True).tolist() == [0, 127, -127, 0]


def test_quantize_activations_is_a_float32_division() -> None:
    # Search float32 values whose quantization depends on how x / s is computed:
    # float32 division vs float64 division vs multiplication by the reciprocal.
    rng = np.random.default_rng(3)
    scale = np.float32(0.1)
    x = (rng.integers(0, 2540, 200_000).astype(np.float32) + np.float32(0.5)) * scale
    want = np.clip(np.rint(x / scale), 0, 255)
    by_f64 = np.clip(np.rint(x.astype(np.float64) / np.float64(scale)), 0, 255)
    by_recip = np.clip(np.rint(x * (np.float32(1) / scale)), 0, 255)
    differs = (want != by_f64) | (want != by_recip)
    assert differs.any(), "no discriminating value found; widen the search"
    got = ref.quantize_activations(x[differs], scale, act_signed=False)
    np.testing.assert_array_equal(got, want[differs])


def test_quantize_activations_scale_cast_to_float32() -> None:
    # x_scale given as a Python float (float64) is used as float32(x_scale)
    x = np.float32(0.3) * np.arange(50, dtype=np.float32)
    got = ref.quantize_activations(x, 0.3, act_signed=False)
    want = np.clip(np.rint(x / np.float32(0.3)), 0, 255)
    np.testing.assert_array_equal(got, want)


def test_quantize_weights_per_channel_conv() -> None:
    w = np.zeros((3, 2, 1, 2), np.float32)
    w[0] = np.array([1.27, -0.635, 0.005, 0.0]).reshape(2, 1, 2)  # max 1.27
    w[1] = 0.0  # a channel of zeros
    w[2] = np.array([-2.0, 1.0, 0.5, 0.25]).reshape(2, 1, 2)
    wq, s = ref.quantize_weights(w, axis=0)
    assert wq.dtype == np.int8 and s.dtype == np.float32
    assert s[0] == np.float32(1.27) / np.float32(127)
    assert s[1] == 1.0
    assert s[2] == np.float32(2.0) / np.float32(127)
    assert wq[1].tolist() == [[[0, 0]], [[0, 0]]]
    assert wq[0].reshape(-1)[0] == 127 and wq[2].reshape(-1)[0] == -127
    for c in range(3):
        want = np.clip(np.rint(w[c] / s[c]), -127, 127)
        np.testing.assert_array_equal(wq[c], want)


def test_quantize_weights_matmul_columns_and_ties() -> None:
    # axis 1: one scale per column of a [K, N] weight. Column 0 has max 127 -> scale 1,
    # so values k + 0.5 are exact ties and round half to even.
    w = np.array([[127.0, -3.0], [0.5, 6.0], [1.5, 0.0], [-2.5, 1.0]], np.float32)
    wq, s = ref.quantize_weights(w, axis=1)
    assert s.tolist() == [1.0, np.float32(6.0) / np.float32(127)]
    assert wq[:, 0].tolist() == [127, 0, 2, -2]
    assert wq[:, 1].tolist() == np.clip(np.rint(w[:, 1] / s[1]), -127, 127).tolist()


# ----------------------------------------------------------------------------- layout


def test_thread_layout_channel_and_interleave() -> None:
    # Conv with C_g=3 channels of 2 kernel positions, T=2: blocks of ceil(3/2)=2 channels
    assert ref.thread_layout(6, 2, "channel", channel_size=2).tolist() == [
        [0, 4],
        [1, 5],
        [2, -1],
        [3, -1],
    ]
    assert ref.thread_layout(6, 2, "interleave", channel_size=2).tolist() == [
        [0, 1],
        [2, 3],
        [4, 5],
    ]
    # C_g=5, T=4: blocks of 2 channels; the last thread never works
    assert ref.thread_layout(5, 4, "channel").tolist() == [[0, 2, 4, -1], [1, 3, -1, -1]]
    assert ref.thread_layout(5, 4, "interleave").tolist() == [[0, 1, 2, 3], [4, -1, -1, -1]]
    # depthwise (C_g=1), T=2: one thread does everything
    assert ref.thread_layout(3, 2, "channel", channel_size=3).tolist() == [
        [0, -1],
        [1, -1],
        [2, -1],
    ]
    assert ref.thread_layout(4, 1, "channel").tolist() == [[0], [1], [2], [3]]


# ----------------------------------------------------------------------------- hand-computed NB-SMT


def _mm(a: list[int], w: list[int], **attrs: object) -> tuple[int, list[int]]:
    """One dot product through nbsmt_matmul with unit scales; returns (acc, stats)."""
    y, stats = ref.nbsmt_matmul(
        np.array([a], np.float32),
        np.array(w, np.int8).reshape(-1, 1),
        1.0,
        np.ones(1, np.float32),
        **attrs,  # type: ignore[arg-type]
    )
    assert float(y[0, 0]).is_integer()
    return int(y[0, 0]), stats.tolist()


# a = [200, 0, 30, 5], w = [3, 7, -20, 9]; exact: 600 - 600 + 45 = 45
# channel: thread 0 takes k 0,1; thread 1 takes k 2,3
#   step 0: (200,3) and (30,-20) active, n = 2; step 1: only (5,9), n = 1 -> 45
#   activations: R(200)=192, R(30)=32 -> 576 - 640 + 45 = -19, two operands changed
#   weights:     R(3)=3, R(-20)=-16   -> 600 - 480 + 45 = 165, one operand changed
# interleave: step 0: (200,3), (0,7) -> n = 1 -> 600; step 1: (30,-20), (5,9) -> n = 2
#   activations: R(30)=32, R(5)=5     -> 600 - 640 + 45 = 5, one changed
#   weights:     R(-20)=-16, R(9)=16  -> 600 - 480 + 80 = 200, two changed
@pytest.mark.parametrize(
    ("mapping", "reduce", "acc", "stats"),
    [
        ("channel", "activations", -19, [2, 3, 1, 2]),
        ("channel", "weights", 165, [2, 3, 1, 1]),
        ("interleave", "activations", 5, [2, 3, 1, 1]),
        ("interleave", "weights", 200, [2, 3, 1, 2]),
    ],
)
def test_two_threads_by_hand(mapping: str, reduce: str, acc: int, stats: list[int]) -> None:
    got = _mm([200, 0, 30, 5], [3, 7, -20, 9], threads=2, mapping=mapping, reduce=reduce)
    assert got == (acc, stats)


# a = [17, 90, 255, 3, 40, 0], w = [5, -100, 60, 2, -9, 50]; exact 6031
# channel, T=4: blocks of ceil(6/4)=2: t0 k0,1; t1 k2,3; t2 k4,5; t3 idle
#   step 0: (17,5) (255,60) (40,-9): n = 3 -> both reduced:
#           16*5 + 240*64 + 32*(-16) = 80 + 15360 - 512 = 14928; changed: 17,255,60,40,-9 = 5
#   step 1: (90,-100) (3,2), (0,50) idle: n = 2
#           activations: R(90)=96 -> -9600 + 6 = -9594 -> 5334; changed 1
#           weights: R(-100)=-96 -> -8640 + 6 = -8634 -> 6294; changed 1
# interleave, T=4: step 0: k0..3 all active, n = 4 -> both reduced:
#           80 + 96*(-96) + 240*64 + 3*2 = 80 - 9216 + 15360 + 6 = 6230; changed: 17,90,-100,255,60 = 5
#   step 1: (40,-9) active, (0,50) idle, two idle slots: n = 1 -> -360 -> 5870
@pytest.mark.parametrize(
    ("mapping", "reduce", "acc", "stats"),
    [
        ("channel", "activations", 5334, [2, 5, 2, 6]),
        ("channel", "weights", 6294, [2, 5, 2, 6]),
        ("interleave", "activations", 5870, [2, 5, 1, 5]),
        ("interleave", "weights", 5870, [2, 5, 1, 5]),
    ],
)
def test_four_threads_by_hand(mapping: str, reduce: str, acc: int, stats: list[int]) -> None:
    a, w = [17, 90, 255, 3, 40, 0], [5, -100, 60, 2, -9, 50]
    assert _mm(a, w, threads=4, mapping=mapping, reduce=reduce) == (acc, stats)
    assert _mm(a, w, threads=1)[0] == 6031


def test_signed_activations_by_hand() -> None:
    # interleave, T=2: one step, (-9,1) and (8,1) both active: R(-9)=-16, R(8)=0
    assert _mm([-9, 8], [1, 1], threads=2, mapping="interleave", act_signed=1) == (
        -16,
        [1, 2, 1, 2],
    )
    # unsigned mode clips the -9 to 0: a single active thread, exact
    assert _mm([-9, 8], [1, 1], threads=2, mapping="interleave", act_signed=0) == (8, [1, 1, 0, 0])


def test_conv_padding_is_idle_by_hand() -> None:
    # 1-D conv, C=1, kernel 2, pads 1/1, T=2 interleave: each output element is one step
    # x = [16, 24], w = [1, 1]; padded [0, 16, 24, 0]
    #   out0: (0,1) idle, (16,1) -> n = 1 -> 16
    #   out1: (16,1), (24,1) -> n = 2 -> R(16)=16, R(24)=32 -> 48; one operand changed
    #   out2: (24,1), (0,1) idle -> 24
    y, stats = ref.nbsmt_conv(
        np.array([[[16, 24]]], np.float32),
        np.array([[[1, 1]]], np.int8),
        1.0,
        np.ones(1, np.float32),
        pads=[1, 1],
        threads=2,
        mapping="interleave",
    )
    assert y.tolist() == [[[16.0, 48.0, 24.0]]]
    assert stats.tolist() == [3, 4, 1, 1]


# ----------------------------------------------------------------------------- a plain loop


def _loop_dot(
    xs: list[int],
    ws: list[int],
    *,
    threads: int,
    mapping: str,
    reduce: str,
    signed: bool,
    channel: int,
) -> tuple[int, list[int]]:
    """docs/spec.md §3.3 as a straightforward loop over Python ints (shares no code with ref)."""

    def r(v: int, sig: bool) -> int:
        if sig:
            return v if -8 <= v <= 7 else min(max(round(v / 16), -8), 7) * 16
        return v if v < 16 else min(max(round(v / 16), 0), 15) * 16

    k = len(xs)
    if mapping == "channel":
        block = -(-(k // channel) // threads) * channel
        lanes = [list(range(t * block, min((t + 1) * block, k))) for t in range(threads)]
        steps = block
    else:
        lanes = [list(range(t, k, threads)) for t in range(threads)]
        steps = -(-k // threads)
    acc, stats = 0, [0, 0, 0, 0]
    for s in range(steps):
        slots = [(xs[lane[s]], ws[lane[s]]) for lane in lanes if s < len(lane)]
        active = [(x, w) for x, w in slots if x != 0 and w != 0]
        n = len(active)
        stats[0] += 1
        stats[1] += n
        stats[2] += n >= 2
        for x, w in active:
            rx = (n == 2 and reduce == "activations") or n >= 3
            rw = (n == 2 and reduce == "weights") or n >= 3
            x2 = r(x, signed) if rx else x
            w2 = r(w, True) if rw else w
            stats[3] += (x2 != x) + (w2 != w)
            acc += x2 * w2
    return acc, stats


def _smt_settings() -> list[tuple[int, str, str, int]]:
    return list(itertools.product((1, 2, 4), schema.MAPPING_CHOICES, schema.REDUCE_CHOICES, (0, 1)))


@pytest.mark.parametrize(("threads", "mapping", "reduce", "signed"), _smt_settings())
def test_matmul_equals_plain_loop(threads: int, mapping: str, reduce: str, signed: int) -> None:
    rng = np.random.default_rng(threads * 100 + len(mapping) * 10 + len(reduce) + signed)
    for _ in range(6):
        k, n = int(rng.integers(1, 23)), int(rng.integers(1, 4))
        lo, hi = schema.ACT_RANGE[bool(signed)]
        a = rng.integers(lo, hi + 1, (3, k)) * (rng.random((3, k)) < 0.6)
        b = (rng.integers(-127, 128, (k, n)) * (rng.random((k, n)) < 0.7)).astype(np.int8)
        y, stats = ref.nbsmt_matmul(
            a.astype(np.float32),
            b,
            1.0,
            np.ones(n, np.float32),
            threads=threads,
            mapping=mapping,
            reduce=reduce,
            act_signed=signed,
        )
        total = [0, 0, 0, 0]
        for i, j in itertools.product(range(3), range(n)):
            acc, st = _loop_dot(
                a[i].tolist(),
                b[:, j].tolist(),
                threads=threads,
                mapping=mapping,
                reduce=reduce,
                signed=bool(signed),
                channel=1,
            )
            assert y[i, j] == np.float32(acc), (i, j, k)
            total = [t + s for t, s in zip(total, st, strict=True)]
        assert stats.tolist() == total


@pytest.mark.parametrize(("threads", "mapping", "reduce", "signed"), _smt_settings())
def test_conv_equals_plain_loop(threads: int, mapping: str, reduce: str, signed: int) -> None:
    """2-D grouped conv with padding/stride/dilation against a loop over output elements."""
    rng = np.random.default_rng(7 + threads * 100 + len(mapping) * 10 + len(reduce) + signed)
    group, c_g, m_g, kh, kw = 2, 3, 2, 2, 3
    h, w_ = 5, 6
    pads, strides, dilations = [1, 0, 2, 1], [2, 1], [1, 2]
    lo, hi = schema.ACT_RANGE[bool(signed)]
    x = rng.integers(lo, hi + 1, (2, group * c_g, h, w_)) * (
        rng.random((2, group * c_g, h, w_)) < 0.5
    )
    wq = (
        rng.integers(-127, 128, (group * m_g, c_g, kh, kw)) * (rng.random((4, c_g, kh, kw)) < 0.7)
    ).astype(np.int8)
    y, stats = ref.nbsmt_conv(
        x.astype(np.float32),
        wq,
        1.0,
        np.ones(group * m_g, np.float32),
        group=group,
        pads=pads,
        strides=strides,
        dilations=dilations,
        threads=threads,
        mapping=mapping,
        reduce=reduce,
        act_signed=signed,
    )
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    out_h = (h + pads[0] + pads[2] - (dilations[0] * (kh - 1) + 1)) // strides[0] + 1
    out_w = (w_ + pads[1] + pads[3] - (dilations[1] * (kw - 1) + 1)) // strides[1] + 1
    assert y.shape == (2, group * m_g, out_h, out_w)
    total = [0, 0, 0, 0]
    for n, m, i, j in itertools.product(range(2), range(group * m_g), range(out_h), range(out_w)):
        g = m // m_g
        xs, ws = [], []
        for c in range(c_g):  # channel-major, then kernel position row-major
            for a, b in itertools.product(range(kh), range(kw)):
                xs.append(
                    int(
                        xp[
                            n,
                            g * c_g + c,
                            i * strides[0] + a * dilations[0],
                            j * strides[1] + b * dilations[1],
                        ]
                    )
                )
                ws.append(int(wq[m, c, a, b]))
        acc, st = _loop_dot(
            xs,
            ws,
            threads=threads,
            mapping=mapping,
            reduce=reduce,
            signed=bool(signed),
            channel=kh * kw,
        )
        assert y[n, m, i, j] == np.float32(acc), (n, m, i, j)
        total = [t + s for t, s in zip(total, st, strict=True)]
    assert stats.tolist() == total


# ----------------------------------------------------------------------------- T=1 == int8


def _random_conv_geometry(rng: np.random.Generator) -> dict[str, object]:
    rank = int(rng.integers(1, 4))
    auto_pad = str(rng.choice(schema.AUTO_PAD_CHOICES))
    kernel = [int(k) for k in rng.integers(1, 4, rank)]
    dilations = [int(d) for d in rng.integers(1, 3, rank)]
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    geo: dict[str, object] = {
        "auto_pad": auto_pad,
        "kernel_shape": kernel,
        "strides": [int(s) for s in rng.integers(1, 4, rank)],
        "dilations": dilations,
        "group": int(rng.choice([1, 2, 3])),
        # at least the dilated kernel extent, so even VALID has an output
        "spatial": [e + int(rng.integers(0, 4 if rank < 3 else 2)) for e in extent],
    }
    if auto_pad == "NOTSET":
        geo["pads"] = [int(p) for p in rng.integers(0, 3, 2 * rank)]
    return geo


def test_threads_1_equals_plain_int8() -> None:
    rng = np.random.default_rng(11)
    for case in range(40):
        geo = _random_conv_geometry(rng)
        spatial = geo.pop("spatial")
        group = int(geo["group"])  # type: ignore[call-overload]
        c_g, m_g = int(rng.integers(1, 5)), int(rng.integers(1, 3))
        x = rng.normal(0, 1, (int(rng.integers(1, 3)), group * c_g, *spatial)).astype(np.float32)  # type: ignore[misc]
        w = rng.integers(-127, 128, (group * m_g, c_g, *geo["kernel_shape"])).astype(np.int8)  # type: ignore[misc]
        x_scale, w_scale = np.float32(0.02), rng.uniform(0.001, 0.1, group * m_g).astype(np.float32)
        bias = rng.normal(0, 1, group * m_g).astype(np.float32) if case % 2 else None
        signed = case % 3 == 0
        y, stats = ref.nbsmt_conv(
            x, w, x_scale, w_scale, bias, threads=1, act_signed=int(signed), **geo
        )  # type: ignore[arg-type]
        xq = ref.quantize_activations(x, x_scale, signed)
        acc = ref.int8_conv(xq, w, **geo)  # type: ignore[arg-type]
        want = (
            np.float32(x_scale)
            * w_scale[None, :, None]
            * acc.reshape(*acc.shape[:2], -1).astype(np.float32)
        )
        if bias is not None:
            want = want + bias[None, :, None]
        np.testing.assert_array_equal(y.reshape(want.shape), want)
        # T=1: one step per reduction element, never a collision
        nonzero = ref.int8_conv((xq != 0).astype(np.int64), (w != 0).astype(np.int8), **geo)  # type: ignore[arg-type]
        k = c_g * math.prod(geo["kernel_shape"])  # type: ignore[call-overload]
        assert stats.tolist() == [acc.size * k, int(nonzero.sum()), 0, 0]


@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 1, 3)])
def test_matmul_threads_1_equals_plain_int8(lead: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(lead))
    a = rng.normal(0, 2, (*lead, 13)).astype(np.float32)
    b = rng.integers(-127, 128, (13, 5)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    y, stats = ref.nbsmt_matmul(a, b, 0.05, scale, threads=1, act_signed=1)
    acc = ref.int8_matmul(ref.quantize_activations(a, 0.05, True), b)
    np.testing.assert_array_equal(y, np.float32(0.05) * scale * acc.astype(np.float32))
    assert y.shape == (*lead, 5)
    assert stats[0] == acc.size * 13 and stats[2] == stats[3] == 0


# ----------------------------------------------------------------------------- geometry vs onnx


def _onnx_conv(x: np.ndarray, w: np.ndarray, attrs: dict[str, object]) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "conv",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ReferenceEvaluator(model).run(None, {"x": x, "w": w})[0]


def test_conv_geometry_matches_onnx_reference_conv() -> None:
    # Integer-valued data with |x|, |w| <= 15 and K <= 3*27: every float32 sum is
    # exact (< 2^24), so the comparison is exact.
    rng = np.random.default_rng(5)
    for _ in range(60):
        geo = _random_conv_geometry(rng)
        spatial = geo.pop("spatial")
        group = int(geo["group"])  # type: ignore[call-overload]
        c_g, m_g = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        x = rng.integers(0, 16, (2, group * c_g, *spatial)).astype(np.float32)  # type: ignore[misc]
        w = rng.integers(-15, 16, (group * m_g, c_g, *geo["kernel_shape"])).astype(np.int8)  # type: ignore[misc]
        y, _ = ref.nbsmt_conv(x, w, 1.0, np.ones(group * m_g, np.float32), threads=1, **geo)  # type: ignore[arg-type]
        want = _onnx_conv(x, w.astype(np.float32), geo)
        assert y.shape == want.shape, geo
        np.testing.assert_array_equal(y, want, err_msg=str(geo))


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "auto_pad", "begin", "end", "out"),
    [
        (7, 3, 2, 1, "SAME_UPPER", 1, 1, 4),
        (6, 3, 2, 1, "SAME_UPPER", 0, 1, 3),  # odd total: extra at the end
        (6, 3, 2, 1, "SAME_LOWER", 1, 0, 3),  # odd total: extra at the beginning
        (5, 3, 1, 2, "SAME_UPPER", 2, 2, 5),  # dilated extent 5
        (5, 1, 3, 1, "SAME_UPPER", 0, 0, 2),  # negative need clamps to 0
        (7, 3, 2, 1, "VALID", 0, 0, 3),
    ],
)
def test_conv_geometry_auto_pad(
    size: int,
    kernel: int,
    stride: int,
    dilation: int,
    auto_pad: str,
    begin: int,
    end: int,
    out: int,
) -> None:
    geo = ref.conv_geometry(
        [size], [kernel], auto_pad=auto_pad, strides=[stride], dilations=[dilation]
    )
    assert (geo.pads_begin, geo.pads_end, geo.output_shape) == ((begin,), (end,), (out,))


# ----------------------------------------------------------------------------- limits and errors


def test_large_k_is_exact() -> None:
    # K = 4608, |x| = 255, |w| = 127: 4608 * 32385 = 149,230,080 > 2^24, so a float32
    # accumulator would round; the reference must stay exact (int64).
    k = 4608
    a = np.full((1, k), 255.0, np.float32)
    b = np.full((k, 2), 127, np.int8)
    b[:, 1] = -127
    for threads in (1, 2, 4):
        y, _ = ref.nbsmt_matmul(
            a, b, 1.0, np.ones(2, np.float32), threads=threads, reduce="weights"
        )
        # T=2 n=2 reduces weights: R(127)=112, R(-127)=-128; T=4 n=4 reduces both: 240
        per = {1: (255 * 127, -255 * 127), 2: (255 * 112, -255 * 128), 4: (240 * 112, -240 * 128)}[
            threads
        ]
        assert y.tolist() == [[np.float32(k * per[0]), np.float32(k * per[1])]]


def test_max_reduction_length_fits_int32() -> None:
    """Any K <= MAX_REDUCTION_LENGTH must keep an int32 accumulator exact.

    The largest |product| the rules allow is found by brute force over all operand
    values, reduced or not (for example an unreduced activation 255 with a weight
    -127 reduced to -128).
    """
    acts = np.arange(-127, 256)
    weights = np.arange(-127, 128)
    values_x = np.concatenate(
        [
            acts,
            ref.reduce_operand(acts[acts >= 0], False),
            ref.reduce_operand(acts[acts <= 127], True),
        ]
    )
    values_w = np.concatenate([weights, ref.reduce_operand(weights, True)])
    largest = int(np.abs(values_x).max()) * int(np.abs(values_w).max())
    assert largest == 255 * 128
    assert schema.MAX_REDUCTION_LENGTH * largest <= 2**31 - 1, (
        f"MAX_REDUCTION_LENGTH={schema.MAX_REDUCTION_LENGTH} overflows int32: "
        f"the largest K is {(2**31 - 1) // largest}"
    )


def test_reduction_length_limit_rejected() -> None:
    k = schema.MAX_REDUCTION_LENGTH + 1
    with pytest.raises(UnsupportedModelError, match="reduction length"):
        ref.nbsmt_matmul(
            np.zeros((1, k), np.float32), np.zeros((k, 1), np.int8), 1.0, np.ones(1, np.float32)
        )
    with pytest.raises(UnsupportedModelError, match="reduction length"):
        ref.nbsmt_conv(
            np.zeros((1, k, 1), np.float32),
            np.zeros((1, k, 1), np.int8),
            1.0,
            np.ones(1, np.float32),
        )


def test_bad_inputs_raise_model_error() -> None:
    x = np.zeros((1, 4, 5, 5), np.float32)
    w = np.zeros((2, 4, 3, 3), np.int8)
    ones = np.ones(2, np.float32)
    with pytest.raises(ModelError, match="group"):
        ref.nbsmt_conv(x, w, 1.0, ones, group=2)
    with pytest.raises(ModelError, match="kernel_shape"):
        ref.nbsmt_conv(x, w, 1.0, ones, kernel_shape=[2, 2])
    with pytest.raises(ModelError, match="w_scale"):
        ref.nbsmt_conv(x, w, 1.0, np.ones(3, np.float32))
    with pytest.raises(ModelError, match="threads"):
        ref.nbsmt_conv(x, w, 1.0, ones, threads=3)
    with pytest.raises(ModelError, match="empty"):
        ref.nbsmt_conv(x, np.zeros((2, 4, 7, 7), np.int8), 1.0, ones)
    with pytest.raises(ModelError, match="> 0"):
        ref.nbsmt_conv(x, w, 0.0, ones)
    with pytest.raises(ModelError, match="> 0"):
        ref.nbsmt_matmul(np.zeros((2, 4), np.float32), np.zeros((4, 2), np.int8), np.nan, ones)
    with pytest.raises(ModelError, match="Bq"):
        ref.nbsmt_matmul(np.zeros((2, 5), np.float32), np.zeros((4, 2), np.int8), 1.0, ones)


# ----------------------------------------------------------------------------- ONNX integration


def _opsets() -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", 17), helper.make_opsetid(schema.DOMAIN, schema.OPSET_VERSION)]


def _conv_model(
    x_shape: list[int | str], w_shape: list[int], with_stats: bool, **attrs: object
) -> onnx.ModelProto:
    m = w_shape[0]
    outputs = ["y", "stats"] if with_stats else ["y"]
    node = helper.make_node(
        schema.CONV, ["x", "w", "xs", "ws"], outputs, domain=schema.DOMAIN, **attrs
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [
            helper.make_tensor_value_info(
                o, TensorProto.FLOAT if o == "y" else TensorProto.INT64, None
            )
            for o in outputs
        ],
        initializer=[
            numpy_helper.from_array(np.zeros(w_shape, np.int8), "w"),
            numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
            numpy_helper.from_array(np.ones(m, np.float32), "ws"),
        ],
    )
    return helper.make_model(graph, opset_imports=_opsets())


def _dims(model: onnx.ModelProto, name: str) -> list[int | str]:
    for vi in list(model.graph.output) + list(model.graph.value_info):
        if vi.name == name:
            return [
                d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in vi.type.tensor_type.shape.dim
            ]
    raise KeyError(name)


def test_schema_registration_is_idempotent() -> None:
    onnx_schema.register_schemas()
    onnx_schema.register_schemas()
    for op in schema.OP_TYPES:
        s = onnx.defs.get_schema(op, schema.OPSET_VERSION, schema.DOMAIN)
        assert s.has_type_and_shape_inference_function
    conv = onnx.defs.get_schema(schema.CONV, schema.OPSET_VERSION, schema.DOMAIN)
    assert [p.name for p in conv.inputs] == list(schema.CONV_INPUTS)
    assert conv.attributes["threads"].default_value.i == schema.SmtAttributes().threads
    assert conv.attributes["mapping"].default_value.s.decode() == schema.SmtAttributes().mapping


def test_shape_inference_conv_matches_reference() -> None:
    onnx_schema.register_schemas()
    rng = np.random.default_rng(9)
    for _ in range(40):
        geo = _random_conv_geometry(rng)
        spatial = geo.pop("spatial")
        group = int(geo["group"])  # type: ignore[call-overload]
        kernel = geo.pop("kernel_shape")
        x = np.zeros((2, group * 2, *spatial), np.float32)  # type: ignore[misc]
        w_shape = [group * 3, 2, *kernel]  # type: ignore[misc]
        y, _ = ref.nbsmt_conv(
            x, np.zeros(w_shape, np.int8), 1.0, np.ones(group * 3, np.float32), **geo
        )  # type: ignore[arg-type]
        model = _conv_model(["N", group * 2, *spatial], w_shape, with_stats=True, **geo)  # type: ignore[misc]
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        assert _dims(inferred, "y") == ["N", *y.shape[1:]], geo
        assert _dims(inferred, "stats") == [4]


def test_shape_inference_conv_unknown_spatial_and_errors() -> None:
    onnx_schema.register_schemas()
    model = _conv_model(
        [1, 3, "H", 9], [4, 3, 3, 3], with_stats=False, strides=[2, 2], auto_pad="SAME_UPPER"
    )
    dims = _dims(onnx.shape_inference.infer_shapes(model, strict_mode=True), "y")
    assert dims[:2] == [1, 4] and dims[3] == 5
    assert isinstance(dims[2], str)  # unknown (onnx names it unk__N)
    bad = _conv_model([1, 3, 9], [4, 3, 3, 3], with_stats=False)
    with pytest.raises(onnx.shape_inference.InferenceError, match="rank"):
        onnx.shape_inference.infer_shapes(bad, strict_mode=True)


@pytest.mark.parametrize(
    ("a_shape", "y_shape"),
    [
        ([11], [5]),
        (["B", 11], ["B", 5]),
        ([2, 3, 11], [2, 3, 5]),
        ([2, "S", 4, 11], [2, "S", 4, 5]),
    ],
)
def test_shape_inference_matmul(a_shape: list[int | str], y_shape: list[int | str]) -> None:
    onnx_schema.register_schemas()
    node = helper.make_node(
        schema.MATMUL, ["a", "b", "s", "bs", ""], ["y", "stats"], domain=schema.DOMAIN
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(y_shape)),
            helper.make_tensor_value_info("stats", TensorProto.INT64, [None]),
        ],
        initializer=[
            numpy_helper.from_array(np.zeros((11, 5), np.int8), "b"),
            numpy_helper.from_array(np.array(1.0, np.float32), "s"),
            numpy_helper.from_array(np.ones(5, np.float32), "bs"),
        ],
    )
    model = helper.make_model(graph, opset_imports=_opsets())
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert _dims(inferred, "y") == y_shape
    assert _dims(inferred, "stats") == [4]


def test_reference_evaluator_runs_a_graph() -> None:
    """NbSmtConv -> Relu -> Flatten -> NbSmtMatMul, evaluated without the C++ library."""
    rng = np.random.default_rng(21)
    wc = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    wm = rng.integers(-127, 128, (4 * 5 * 5, 6)).astype(np.int8)
    sc, sm = (
        rng.uniform(0.001, 0.01, 4).astype(np.float32),
        rng.uniform(0.001, 0.01, 6).astype(np.float32),
    )
    bias = rng.normal(0, 1, 6).astype(np.float32)
    nodes = [
        helper.make_node(
            schema.CONV,
            ["x", "wc", "xs", "sc"],
            ["c", "cstats"],
            domain=schema.DOMAIN,
            pads=[1, 1, 1, 1],
            threads=4,
        ),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node(
            schema.MATMUL,
            ["f", "wm", "ms", "sm", "bias"],
            ["y"],
            domain=schema.DOMAIN,
            mapping="interleave",
            reduce="weights",
        ),
    ]
    inits = {
        "wc": wc,
        "wm": wm,
        "xs": np.array(0.02, np.float32),
        "ms": np.array(0.05, np.float32),
        "sc": sc,
        "sm": sm,
        "bias": bias,
    }
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("cstats", TensorProto.INT64, None),
        ],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=_opsets())
    x = np.abs(rng.normal(0, 1, (2, 3, 5, 5))).astype(np.float32)
    y, cstats = ref.reference_evaluator(model).run(None, {"x": x})

    c, want_stats = ref.nbsmt_conv(x, wc, inits["xs"], sc, pads=[1, 1, 1, 1], threads=4)
    f = np.maximum(c, 0).reshape(2, -1)
    want, _ = ref.nbsmt_matmul(f, wm, inits["ms"], sm, bias, mapping="interleave", reduce="weights")
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(cstats, want_stats)


def test_reference_evaluator_with_schemas_registered_first(tmp_path: Path) -> None:
    """onnx.reference reads the registered schema's defaults when it is imported after
    registration (pads=None, auto_pad as bytes, ...); the ops must cope. Needs a fresh
    process because onnx.reference snapshots the schemas at import."""
    script = textwrap.dedent(
        """
        from nbsmt_onnx.ops import onnx_schema
        onnx_schema.register_schemas()
        import numpy as np
        import onnx.reference.op_run as op_run
        from onnx import helper as h, numpy_helper as nh
        from nbsmt_onnx.ops import reference as ref
        assert "NbSmtConv" in op_run._schemas
        w = np.arange(54, dtype=np.int8).reshape(2, 3, 3, 3) - 27
        node = h.make_node("NbSmtConv", ["x", "w", "s", "ws"], ["y", "st"], domain="nbsmt", pads=[1, 1, 1, 1])
        graph = h.make_graph(
            [node], "g", [h.make_tensor_value_info("x", 1, [1, 3, 4, 4])],
            [h.make_tensor_value_info("y", 1, None), h.make_tensor_value_info("st", 7, None)],
            initializer=[nh.from_array(w, "w"), nh.from_array(np.array(0.01, np.float32), "s"),
                         nh.from_array(np.ones(2, np.float32), "ws")],
        )
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("nbsmt", 1)])
        x = np.random.default_rng(0).random((1, 3, 4, 4)).astype(np.float32)
        y, st = ref.reference_evaluator(model).run(None, {"x": x})
        want, want_st = ref.nbsmt_conv(x, w, 0.01, np.ones(2, np.float32), pads=[1, 1, 1, 1])
        assert np.array_equal(y, want) and np.array_equal(st, want_st)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def _bn_model(
    opset: int, extra_outputs: tuple[str, ...] = (), **attrs: object
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [4, 3, 5, 5] -> BatchNormalization -> y, with running statistics far from the batch's."""
    rng = np.random.default_rng(5)
    params = {
        "gamma": rng.uniform(0.5, 1.5, 3).astype(np.float32),
        "beta": rng.normal(0, 0.5, 3).astype(np.float32),
        "mean": rng.normal(2.0, 0.5, 3).astype(np.float32),
        "var": rng.uniform(2.0, 4.0, 3).astype(np.float32),
    }
    node = helper.make_node(
        "BatchNormalization",
        ["x", "gamma", "beta", "mean", "var"],
        ["y", *extra_outputs],
        epsilon=1e-3,
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 5, 5])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3, 5, 5]),
            *(helper.make_tensor_value_info(o, TensorProto.FLOAT, [3]) for o in extra_outputs),
        ],
        initializer=[numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model, params


def _bn_inference(x: np.ndarray, p: dict[str, np.ndarray], eps: float) -> np.ndarray:
    """Inference BN computed independently in float64 (running statistics)."""
    c = (-1, 1, 1)
    y = (x.astype(np.float64) - p["mean"].reshape(c)) / np.sqrt(p["var"].reshape(c) + eps)
    return y * p["gamma"].reshape(c) + p["beta"].reshape(c)


@pytest.mark.parametrize(
    ("opset", "attrs"), [(9, {}), (11, {}), (13, {}), (15, {"training_mode": 0}), (17, {})]
)
def test_reference_evaluator_batchnorm_is_inference_mode(opset: int, attrs: dict) -> None:
    """onnx.reference's own BN (opsets 9-13) uses batch statistics; ours the running ones."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    model, params = _bn_model(opset, **attrs)
    x = np.random.default_rng(6).normal(0, 1, (4, 3, 5, 5)).astype(np.float32)
    (got,) = ref.reference_evaluator(model).run(None, {"x": x})
    want = _bn_inference(x, params, 1e-3)
    assert got.dtype == np.float32
    # float32 evaluation of a 4-operation formula vs float64: a few ulps of values ~1.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # ONNX Runtime (inference semantics) computes the same function in float32.
    np.testing.assert_allclose(got, sess.run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)
    if 9 <= opset <= 13:
        # The bug this replaces: onnx.reference fills in momentum=0.9 and normalises with
        # 0.9 * running + 0.1 * batch statistics. The batch mean is ~0 and the running mean
        # ~2, so that moves the outputs by ~0.1-0.2 (measured 0.16); ours by < 1e-5.
        (stock,) = ReferenceEvaluator(model).run(None, {"x": x})
        assert np.abs(stock - want).max() > 0.05


def test_reference_evaluator_refuses_training_mode_batchnorm() -> None:
    model, _ = _bn_model(15, ("running_mean", "running_var"), training_mode=1)
    x = np.zeros((4, 3, 5, 5), np.float32)
    with pytest.raises(UnsupportedModelError, match="training_mode=1"):
        ref.reference_evaluator(model).run(None, {"x": x})


def test_reference_evaluator_caller_ops_win() -> None:
    """``new_ops`` passed by the caller replace the built-in fixes."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
            return (np.full_like(x, 7.0),)

    model, _ = _bn_model(11)
    x = np.zeros((4, 3, 5, 5), np.float32)
    (got,) = ref.reference_evaluator(model, new_ops=[BatchNormalization]).run(None, {"x": x})
    assert np.all(got == 7.0)
