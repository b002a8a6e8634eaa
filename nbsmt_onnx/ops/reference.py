"""NumPy reference of the NB-SMT operators (docs/spec.md §2-§3), written from the rules.

This module is the ground truth the C++ library is tested against, integer for
integer. It is written for readability first; it is vectorised with NumPy only
as far as needed for a few thousand small random cases to run quickly.

Pipeline of one operator call (both ops share it):

1. quantize the float activations with one scale (:func:`quantize_activations`);
2. lay every reduction row of K elements out as ``steps x threads`` slots
   (:func:`thread_layout`, :func:`pack`): ``packed[s, t]`` is the element that
   thread ``t`` handles at step ``s``, 0 in idle slots (a zero operand makes a
   slot inactive, so idle slots need no special case);
3. run the NB-SMT reduction over the slots (:func:`nbsmt_accumulate`): at each
   step count the active threads ``n`` and reduce operands with ``R``
   (:func:`reduce_operand`) as docs/spec.md §3.3 says; sum the products exactly in
   int64; count the statistics of docs/spec.md §3.4;
4. scale to float32: ``y = float32(float32(x_scale) * w_scale[m]) * float32(acc)``,
   then ``+ B[m]`` only if a bias is given — every operation in float32, the
   accumulator converted with round-to-nearest. The C++ op uses the same
   formula, so the outputs agree bit for bit.

Plain int8 arithmetic (:func:`int8_conv`, :func:`int8_matmul`) is implemented
separately (shift-and-accumulate, no packing) so tests can show that
``threads=1`` is exactly int8 quantized arithmetic.

:class:`NbSmtConv` and :class:`NbSmtMatMul` plug both ops into
``onnx.reference.ReferenceEvaluator``; :func:`reference_evaluator` builds one,
so whole graphs run without the C++ library (it also replaces ``onnx.reference``'s
BatchNormalization, which uses batch statistics for opsets 9-13, by an
inference-mode one: :class:`BatchNormalization`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from nbsmt_onnx.errors import ModelError, UnsupportedModelError
from nbsmt_onnx.ops import schema

__all__ = [
    "BatchNormalization",
    "ConvGeometry",
    "NbSmtConv",
    "NbSmtMatMul",
    "conv_geometry",
    "int8_conv",
    "int8_matmul",
    "nbsmt_accumulate",
    "nbsmt_conv",
    "nbsmt_matmul",
    "pack",
    "quantize_activations",
    "quantize_weights",
    "reduce_operand",
    "reference_evaluator",
    "thread_layout",
]

#: Upper bound on the number of (row, column, step, thread) elements the
#: reduction materialises at once; bounds the reference's memory use.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- quantization


def quantize_activations(
    x: np.ndarray, x_scale: float | np.ndarray, act_signed: bool | int
) -> np.ndarray:
    """Quantize activations with one per-tensor scale (docs/spec.md §2), as int16.

    ``x / x_scale`` is an IEEE float32 division (as ONNX QuantizeLinear does, not a
    multiplication by a reciprocal), rounded half to even (``np.rint``); NaN becomes 0;
    the result is clipped to [0, 255] (unsigned) or [-127, 127] (signed).
    """
    lo, hi = schema.ACT_RANGE[bool(act_signed)]
    scale = np.float32(np.asarray(x_scale, dtype=np.float32).reshape(-1)[0])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint(np.asarray(x, dtype=np.float32) / scale)
    q = np.where(np.isnan(q), np.float32(0), q)
    return np.clip(q, lo, hi).astype(np.int16)


def quantize_weights(w: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 quantization of a weight (docs/spec.md §2).

    ``axis`` is the output-channel axis: 0 for a Conv weight [M, C/group, k...],
    1 for a MatMul right operand [K, N]. Returns ``(Wq int8, s_w float32[M])`` with
    ``s_w = max|W| / 127`` (a channel of zeros gets scale 1) and
    ``Wq = clip(round_half_even(W / s_w), -127, 127)``.

    Everything is float32 (the weight is cast first; the max, the division by 127
    and the division by ``s_w`` are float32 operations), matching ONNX
    QuantizeLinear's float32 semantics, so a QDQ export with the same scales
    reproduces exactly these integers.
    """
    w32 = np.asarray(w, dtype=np.float32)
    if w32.ndim < 1:
        raise ModelError(f"weight must have at least one axis, got shape {w32.shape}")
    axis = axis % w32.ndim
    other = tuple(i for i in range(w32.ndim) if i != axis)
    absmax = np.max(np.abs(w32), axis=other) if other else np.abs(w32)
    scale = (absmax / np.float32(127)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    shape = [1] * w32.ndim
    shape[axis] = -1
    q = np.rint(w32 / scale.reshape(shape))
    wq = np.clip(q, *schema.WEIGHT_RANGE).astype(np.int8)
    return wq, scale


# --------------------------------------------------------------------------- NB-SMT rules


def reduce_operand(v: np.ndarray | int, signed: bool | int) -> np.ndarray:
    """The 4-bit window ``R`` of docs/spec.md §3.3, elementwise, on the 8-bit grid (int32).

    unsigned: ``v`` if ``v < 16`` else ``clip(round_half_even(v / 16), 0, 15) * 16``;
    signed: ``v`` if ``-8 <= v <= 7`` else ``clip(round_half_even(v / 16), -8, 7) * 16``.
    ``v / 16`` is exact in float64 for every 8-bit value, so ``np.rint`` rounds the
    true quotient half to even.
    """
    v = np.asarray(v).astype(np.int32)
    q = np.rint(v / 16.0)
    if signed:
        keep = (v >= -8) & (v <= 7)
        reduced = np.clip(q, -8, 7) * 16
    else:
        keep = v < 16
        reduced = np.clip(q, 0, 15) * 16
    return np.where(keep, v, reduced).astype(np.int32)


def thread_layout(k: int, threads: int, mapping: str, channel_size: int = 1) -> np.ndarray:
    """Which flattened reduction element each thread handles at each step.

    Returns an int64 array ``[steps, threads]`` of indices into the K axis, -1 for
    an idle slot. ``channel_size`` is the number of consecutive K elements that
    belong to one input channel (the kernel size for a Conv, 1 for a MatMul).

    - ``mapping="channel"``: the ``K / channel_size`` channels are split into
      ``threads`` contiguous blocks of ``ceil(channels / threads)`` channels;
      thread ``t`` walks its block in order, so ``steps`` is the block length in
      elements and a block that runs past the end has idle slots.
    - ``mapping="interleave"``: element ``k`` goes to thread ``k mod T`` at step
      ``k div T``.
    """
    if threads not in schema.THREADS_CHOICES:
        raise ModelError(f"threads must be one of {schema.THREADS_CHOICES}, got {threads!r}")
    if k < 0 or channel_size < 1 or k % channel_size:
        raise ModelError(f"reduction length {k} is not a multiple of channel size {channel_size}")
    if mapping == "channel":
        channels = k // channel_size
        block = math.ceil(channels / threads) * channel_size
        steps = block
        index = np.arange(threads)[None, :] * block + np.arange(steps)[:, None]
    elif mapping == "interleave":
        steps = math.ceil(k / threads)
        index = np.arange(steps)[:, None] * threads + np.arange(threads)[None, :]
    else:
        raise ModelError(f"mapping must be one of {schema.MAPPING_CHOICES}, got {mapping!r}")
    return np.where(index < k, index, -1).astype(np.int64)


def pack(rows: np.ndarray, layout: np.ndarray) -> np.ndarray:
    """Reorder ``rows [P, K]`` into ``[P, steps, threads]`` by ``layout``; idle slots are 0."""
    rows = np.asarray(rows)
    padded = np.concatenate([rows, np.zeros((rows.shape[0], 1), dtype=rows.dtype)], axis=1)
    # index -1 (idle) picks the appended zero column
    return padded[:, layout]


def nbsmt_accumulate(
    x_packed: np.ndarray,
    w_packed: np.ndarray,
    *,
    threads: int,
    reduce: str,
    act_signed: bool | int,
) -> tuple[np.ndarray, np.ndarray]:
    """NB-SMT reduction of every activation row with every weight row (docs/spec.md §3.3).

    ``x_packed [P, S, T]`` quantized activations, ``w_packed [M, S, T]`` int8 weights,
    both in the packed layout. Returns ``(acc int64 [P, M], stats int64 [4])`` with
    stats = [groups, active_slots, collisions, reduced_operands] (docs/spec.md §3.4).

    At each step thread t is active iff its activation and weight are non-zero;
    ``n`` counts the active threads. n <= 1: exact. n == 2: the active
    activations (``reduce="activations"``) or weights (``reduce="weights"``) go
    through R. n >= 3 (only possible with T = 4): both operands of every active
    thread go through R. T = 1 therefore is exact int8 arithmetic.
    """
    if reduce not in schema.REDUCE_CHOICES:
        raise ModelError(f"reduce must be one of {schema.REDUCE_CHOICES}, got {reduce!r}")
    x = np.asarray(x_packed).astype(np.int32)
    w = np.asarray(w_packed).astype(np.int32)
    if x.ndim != 3 or w.ndim != 3 or x.shape[1:] != w.shape[1:] or x.shape[2] != threads:
        raise ModelError(
            f"packed operands must be [P, S, {threads}] and [M, S, {threads}], "
            f"got {x.shape} and {w.shape}"
        )
    p_rows, steps, _ = x.shape
    m_rows = w.shape[0]
    x_red = reduce_operand(x, act_signed)
    w_red = reduce_operand(w, signed=True)
    x_changed = x_red != x
    w_changed = w_red != w

    acc = np.zeros((p_rows, m_rows), dtype=np.int64)
    stats = np.zeros(4, dtype=np.int64)
    stats[0] = p_rows * m_rows * steps
    per_row = max(1, m_rows * steps * threads)
    chunk = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, p_rows, chunk):
        sl = slice(start, start + chunk)
        xs, ws = x[sl, None], w[None]  # [p, 1, S, T], [1, M, S, T]
        active = (xs != 0) & (ws != 0)  # [p, M, S, T]
        n = active.sum(axis=-1, dtype=np.int64)  # [p, M, S]
        both = n >= 3
        reduce_x = ((n == 2) & (reduce == "activations")) | both
        reduce_w = ((n == 2) & (reduce == "weights")) | both
        rx = active & reduce_x[..., None]
        rw = active & reduce_w[..., None]
        x_eff = np.where(rx, x_red[sl, None], xs)
        w_eff = np.where(rw, w_red[None], ws)
        # inactive slots keep their original operands, one of which is 0
        acc[sl] = (x_eff * w_eff).sum(axis=(2, 3), dtype=np.int64)
        stats[1] += int(n.sum())
        stats[2] += int(np.count_nonzero(n >= 2))
        stats[3] += int(np.count_nonzero(rx & x_changed[sl, None]))
        stats[3] += int(np.count_nonzero(rw & w_changed[None]))
    return acc, stats


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ConvGeometry:
    """Resolved ONNX Conv geometry for the spatial axes of one call."""

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    output_shape: tuple[int, ...]


def conv_geometry(
    input_shape: Sequence[int],
    kernel_shape: Sequence[int],
    *,
    auto_pad: str = "NOTSET",
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
) -> ConvGeometry:
    """Resolve pads and the output spatial shape exactly as ONNX Conv does.

    ``input_shape`` holds the spatial dims. ``auto_pad``:
    NOTSET uses ``pads`` ([begin..., end...], default 0); VALID pads nothing;
    SAME_UPPER / SAME_LOWER pad so that ``out = ceil(in / stride)``, the total
    ``max(0, (out - 1) * stride + (k - 1) * dilation + 1 - in)`` split evenly, the
    odd element at the end (UPPER) or the beginning (LOWER).
    """
    rank = len(kernel_shape)
    strides = tuple(strides) if strides else (1,) * rank
    dilations = tuple(dilations) if dilations else (1,) * rank
    pads = tuple(pads) if pads else (0,) * (2 * rank)
    if len(input_shape) != rank or len(strides) != rank or len(dilations) != rank:
        raise ModelError(
            f"Conv spatial rank mismatch: input {tuple(input_shape)}, kernel_shape "
            f"{tuple(kernel_shape)}, strides {strides}, dilations {dilations}"
        )
    if len(pads) != 2 * rank:
        raise ModelError(f"pads must have {2 * rank} values, got {pads}")
    if min(strides) < 1 or min(dilations) < 1 or min(kernel_shape) < 1:
        raise ModelError(
            f"strides, dilations and kernel_shape must be positive, got {strides}, "
            f"{dilations}, {tuple(kernel_shape)}"
        )
    if auto_pad not in schema.AUTO_PAD_CHOICES:
        raise ModelError(f"auto_pad must be one of {schema.AUTO_PAD_CHOICES}, got {auto_pad!r}")
    if auto_pad == "NOTSET" and min(pads) < 0:
        raise ModelError(f"pads must be non-negative, got {pads}")

    begin: list[int] = []
    end: list[int] = []
    out: list[int] = []
    for i in range(rank):
        size = input_shape[i]
        span = (kernel_shape[i] - 1) * dilations[i] + 1  # dilated kernel extent
        if auto_pad == "NOTSET":
            b, e = pads[i], pads[rank + i]
        elif auto_pad == "VALID":
            b, e = 0, 0
        else:
            target = -(-size // strides[i])
            total = max(0, (target - 1) * strides[i] + span - size)
            small, large = total // 2, total - total // 2
            b, e = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
        begin.append(b)
        end.append(e)
        out.append((size + b + e - span) // strides[i] + 1)
    return ConvGeometry(
        kernel_shape=tuple(kernel_shape),
        strides=strides,
        dilations=dilations,
        pads_begin=tuple(begin),
        pads_end=tuple(end),
        output_shape=tuple(out),
    )


def _conv_setup(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    *,
    auto_pad: str,
    dilations: Sequence[int] | None,
    group: int,
    kernel_shape: Sequence[int] | None,
    pads: Sequence[int] | None,
    strides: Sequence[int] | None,
) -> ConvGeometry:
    """Check the X / Wq shapes against each other and the attributes; resolve geometry."""
    if len(x_shape) not in (3, 4, 5):
        raise ModelError(f"NbSmtConv X must be [N, C, D1..Dk] with k in 1..3, got {x_shape}")
    if len(w_shape) != len(x_shape):
        raise ModelError(f"NbSmtConv Wq rank must equal X rank: X {x_shape}, Wq {w_shape}")
    if group < 1 or x_shape[1] != w_shape[1] * group or w_shape[0] % group:
        raise ModelError(
            f"NbSmtConv channels do not fit group={group}: X {x_shape}, Wq {w_shape} "
            f"(need C = Wq.shape[1] * group and M divisible by group)"
        )
    if kernel_shape and tuple(kernel_shape) != tuple(w_shape[2:]):
        raise ModelError(
            f"NbSmtConv kernel_shape {tuple(kernel_shape)} does not match Wq {w_shape}"
        )
    geo = conv_geometry(
        x_shape[2:],
        w_shape[2:],
        auto_pad=auto_pad,
        strides=strides,
        dilations=dilations,
        pads=pads,
    )
    if min(geo.output_shape) < 1:
        raise ModelError(
            f"NbSmtConv output would be empty: X {x_shape}, Wq {w_shape}, "
            f"output spatial {geo.output_shape}"
        )
    return geo


def _patches(x: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """im2col: ``[N, C, kernel_positions, *out]``, kernel positions in row-major order.

    Padded positions are zeros.
    """
    padding = [(0, 0), (0, 0), *zip(geo.pads_begin, geo.pads_end, strict=True)]
    xp = np.pad(x, padding)
    cols = []
    for offset in itertools.product(*(range(k) for k in geo.kernel_shape)):
        index: list[slice] = [slice(None), slice(None)]
        for o, d, s, out in zip(offset, geo.dilations, geo.strides, geo.output_shape, strict=True):
            start = o * d
            index.append(slice(start, start + (out - 1) * s + 1, s))
        cols.append(xp[tuple(index)])
    return np.stack(cols, axis=2)


def _smt_attributes(
    threads: int, mapping: str, reduce: str, act_signed: int
) -> schema.SmtAttributes:
    try:
        return schema.SmtAttributes(
            threads=int(threads), mapping=mapping, reduce=reduce, act_signed=int(act_signed)
        )
    except ValueError as err:
        raise ModelError(f"invalid NB-SMT attribute: {err}") from err


def _check_reduction_length(k: int, op: str) -> None:
    if k > schema.MAX_REDUCTION_LENGTH:
        raise UnsupportedModelError(
            f"{op} reduction length K={k} exceeds {schema.MAX_REDUCTION_LENGTH}, the largest "
            f"the int32 accumulator of the C++ op keeps exact; split the layer"
        )


def _scale_output(
    acc: np.ndarray, x_scale: Any, w_scale: np.ndarray, bias: np.ndarray | None, axis: int
) -> np.ndarray:
    """``float32(float32(x_scale) * w_scale[m]) * float32(acc) (+ B[m])``, all float32."""
    sx = np.float32(np.asarray(x_scale, dtype=np.float32).reshape(-1)[0])
    scale = (sx * np.asarray(w_scale, dtype=np.float32)).astype(np.float32)
    shape = [1] * acc.ndim
    shape[axis] = -1
    y = scale.reshape(shape) * acc.astype(np.float32)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32).reshape(shape)
    return y.astype(np.float32)


def _check_vectors(
    op: str, channels: int, scale_name: str, x_scale: Any, w_scale: Any, bias_name: str, bias: Any
) -> None:
    if np.asarray(x_scale).size != 1:
        raise ModelError(f"{op} activation scale must be a scalar, got shape {np.shape(x_scale)}")
    sx = float(np.asarray(x_scale, dtype=np.float32).reshape(-1)[0])
    if not (math.isfinite(sx) and sx > 0):
        # Same rule as the C++ op: a zero, negative or non-finite step quantizes nothing sensibly.
        raise ModelError(f"{op} activation scale must be finite and > 0, got {sx}")
    if np.shape(w_scale) != (channels,):
        raise ModelError(f"{op} {scale_name} must have shape [{channels}], got {np.shape(w_scale)}")
    if bias is not None and np.shape(bias) != (channels,):
        raise ModelError(f"{op} {bias_name} must have shape [{channels}], got {np.shape(bias)}")


# --------------------------------------------------------------------------- operators


def nbsmt_conv(
    X: np.ndarray,
    Wq: np.ndarray,
    x_scale: Any,
    w_scale: np.ndarray,
    B: np.ndarray | None = None,
    *,
    auto_pad: str = "NOTSET",
    dilations: Sequence[int] | None = None,
    group: int = 1,
    kernel_shape: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
    threads: int = 2,
    mapping: str = "channel",
    reduce: str = "activations",
    act_signed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """NbSmtConv (docs/spec.md §3.1, 1-D/2-D/3-D): returns ``(Y float32, stats int64[4])``.

    The reduction of one output element runs over (input channel of its group,
    kernel position), channel-major, the ONNX weight layout; padded positions are
    zeros and so idle slots.
    """
    attrs = _smt_attributes(threads, mapping, reduce, act_signed)
    X = np.asarray(X)
    Wq = np.asarray(Wq)
    geo = _conv_setup(
        X.shape,
        Wq.shape,
        auto_pad=auto_pad,
        dilations=dilations,
        group=group,
        kernel_shape=kernel_shape,
        pads=pads,
        strides=strides,
    )
    n_batch, channels = X.shape[:2]
    m_out = Wq.shape[0]
    c_g, m_g = channels // group, m_out // group
    kernel_size = math.prod(geo.kernel_shape)
    k = c_g * kernel_size
    _check_reduction_length(k, schema.CONV)
    _check_vectors(schema.CONV, m_out, "w_scale", x_scale, w_scale, "B", B)

    xq = quantize_activations(X, x_scale, attrs.act_signed)
    cols = _patches(xq, geo)  # [N, C, KK, *out]
    positions = math.prod(geo.output_shape)
    layout = thread_layout(k, attrs.threads, attrs.mapping, channel_size=kernel_size)
    acc = np.zeros((n_batch, m_out, positions), dtype=np.int64)
    stats = np.zeros(4, dtype=np.int64)
    for g in range(group):
        # rows [N * positions, K] in (channel, kernel position) order
        xg = cols[:, g * c_g : (g + 1) * c_g].reshape(n_batch, k, positions)
        rows = xg.transpose(0, 2, 1).reshape(n_batch * positions, k)
        wg = Wq[g * m_g : (g + 1) * m_g].reshape(m_g, k)
        acc_g, stats_g = nbsmt_accumulate(
            pack(rows, layout),
            pack(wg, layout),
            threads=attrs.threads,
            reduce=attrs.reduce,
            act_signed=attrs.act_signed,
        )
        acc[:, g * m_g : (g + 1) * m_g] = acc_g.reshape(n_batch, positions, m_g).transpose(0, 2, 1)
        stats += stats_g
    acc = acc.reshape(n_batch, m_out, *geo.output_shape)
    return _scale_output(acc, x_scale, w_scale, B, axis=1), stats


def nbsmt_matmul(
    A: np.ndarray,
    Bq: np.ndarray,
    a_scale: Any,
    b_scale: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    threads: int = 2,
    mapping: str = "channel",
    reduce: str = "activations",
    act_signed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """NbSmtMatMul (docs/spec.md §3.2): ``A [..., K] x Bq [K, N]`` -> ``(Y [..., N], stats)``.

    The K axis is split among the threads in blocks of ``ceil(K / T)`` (channel
    mapping) or interleaved.
    """
    attrs = _smt_attributes(threads, mapping, reduce, act_signed)
    A = np.asarray(A)
    Bq = np.asarray(Bq)
    if A.ndim < 1 or Bq.ndim != 2 or A.shape[-1] != Bq.shape[0]:
        raise ModelError(
            f"NbSmtMatMul needs A [..., K] and Bq [K, N], got A {A.shape}, Bq {Bq.shape}"
        )
    k, n_out = Bq.shape
    _check_reduction_length(k, schema.MATMUL)
    _check_vectors(schema.MATMUL, n_out, "b_scale", a_scale, b_scale, "bias", bias)

    lead = A.shape[:-1]
    aq = quantize_activations(A, a_scale, attrs.act_signed).reshape(-1, k)
    layout = thread_layout(k, attrs.threads, attrs.mapping)
    acc, stats = nbsmt_accumulate(
        pack(aq, layout),
        pack(Bq.T, layout),
        threads=attrs.threads,
        reduce=attrs.reduce,
        act_signed=attrs.act_signed,
    )
    acc = acc.reshape(*lead, n_out)
    return _scale_output(acc, a_scale, b_scale, bias, axis=-1), stats


# --------------------------------------------------------------------------- plain int8


def int8_conv(
    Xq: np.ndarray,
    Wq: np.ndarray,
    *,
    auto_pad: str = "NOTSET",
    dilations: Sequence[int] | None = None,
    group: int = 1,
    kernel_shape: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> np.ndarray:
    """Exact integer convolution of already-quantized operands (int64 accumulators).

    Independent of the NB-SMT path (no im2col, no packing): one strided slice of
    the padded input per kernel offset, contracted with that offset's weights.
    """
    Xq = np.asarray(Xq, dtype=np.int64)
    Wq = np.asarray(Wq, dtype=np.int64)
    geo = _conv_setup(
        Xq.shape,
        Wq.shape,
        auto_pad=auto_pad,
        dilations=dilations,
        group=group,
        kernel_shape=kernel_shape,
        pads=pads,
        strides=strides,
    )
    c_g, m_g = Xq.shape[1] // group, Wq.shape[0] // group
    padding = [(0, 0), (0, 0), *zip(geo.pads_begin, geo.pads_end, strict=True)]
    xp = np.pad(Xq, padding)
    out = np.zeros((Xq.shape[0], Wq.shape[0], *geo.output_shape), dtype=np.int64)
    for offset in itertools.product(*(range(k) for k in geo.kernel_shape)):
        index: list[slice] = [slice(None), slice(None)]
        for o, d, s, n in zip(offset, geo.dilations, geo.strides, geo.output_shape, strict=True):
            index.append(slice(o * d, o * d + (n - 1) * s + 1, s))
        window = xp[tuple(index)]  # [N, C, *out]
        for g in range(group):
            w_index: tuple[slice | int, ...] = (slice(g * m_g, (g + 1) * m_g), slice(None), *offset)
            wk = Wq[w_index]  # [m_g, c_g]
            xs = window[:, g * c_g : (g + 1) * c_g]
            out[:, g * m_g : (g + 1) * m_g] += np.einsum("mc,nc...->nm...", wk, xs)
    return out


def int8_matmul(Aq: np.ndarray, Bq: np.ndarray) -> np.ndarray:
    """Exact integer ``Aq [..., K] @ Bq [K, N]`` (int64 accumulators)."""
    return np.matmul(np.asarray(Aq, dtype=np.int64), np.asarray(Bq, dtype=np.int64))


# --------------------------------------------------------------------------- onnx.reference


def _wants_stats(op: OpRun) -> bool:
    return len(op.output) > 1 and op.output[1] != ""


class NbSmtConv(OpRun):
    """``onnx.reference`` implementation of ``nbsmt::NbSmtConv`` (calls :func:`nbsmt_conv`)."""

    op_domain = schema.DOMAIN

    def _run(
        self,
        X: np.ndarray,
        Wq: np.ndarray,
        x_scale: np.ndarray,
        w_scale: np.ndarray,
        B: np.ndarray | None = None,
        auto_pad: str = "NOTSET",
        dilations: Sequence[int] | None = None,
        group: int = 1,
        kernel_shape: Sequence[int] | None = None,
        pads: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        threads: int = 2,
        mapping: str = "channel",
        reduce: str = "activations",
        act_signed: int = 0,
    ) -> tuple[np.ndarray, ...]:
        y, stats = nbsmt_conv(
            X,
            Wq,
            x_scale,
            w_scale,
            B,
            auto_pad=_text(auto_pad),
            dilations=dilations,
            group=group,
            kernel_shape=kernel_shape,
            pads=pads,
            strides=strides,
            threads=threads,
            mapping=_text(mapping),
            reduce=_text(reduce),
            act_signed=act_signed,
        )
        return (y, stats) if _wants_stats(self) else (y,)


class NbSmtMatMul(OpRun):
    """``onnx.reference`` implementation of ``nbsmt::NbSmtMatMul`` (calls :func:`nbsmt_matmul`)."""

    op_domain = schema.DOMAIN

    def _run(
        self,
        A: np.ndarray,
        Bq: np.ndarray,
        a_scale: np.ndarray,
        b_scale: np.ndarray,
        bias: np.ndarray | None = None,
        threads: int = 2,
        mapping: str = "channel",
        reduce: str = "activations",
        act_signed: int = 0,
    ) -> tuple[np.ndarray, ...]:
        y, stats = nbsmt_matmul(
            A,
            Bq,
            a_scale,
            b_scale,
            bias,
            threads=threads,
            mapping=_text(mapping),
            reduce=_text(reduce),
            act_signed=act_signed,
        )
        return (y, stats) if _wants_stats(self) else (y,)


def _text(value: str | bytes) -> str:
    """String attributes arrive as ``str`` or ``bytes`` depending on the onnx version."""
    return value.decode() if isinstance(value, bytes) else value


class BatchNormalization(OpRun):
    """Inference-mode ``BatchNormalization`` (every opset) for reference runs.

    ``onnx.reference``'s own implementation for opsets 9-13 receives the schema
    default ``momentum=0.9`` for every node and then normalises with the
    statistics of the current *batch* (training behaviour), and opsets 6-8
    do the same unless ``is_test=1``. Opsets 9-13 define no training mode at
    all, and ONNX Runtime (like every inference runtime) uses the running
    statistics, so reference runs of inference models (Paddle exports are
    opset 11) disagreed with the runtime. This implementation always uses the
    running statistics, with the formula of ``onnx.reference``'s inference
    path: ``scale * (x - mean) / sqrt(var + epsilon) + bias`` in the input's
    float type. A training-mode node (opset >= 14, ``training_mode=1``) is
    not an inference graph and is refused.
    """

    op_domain = ""

    def _run(
        self,
        x: np.ndarray,
        scale: np.ndarray,
        bias: np.ndarray,
        mean: np.ndarray,
        var: np.ndarray,
        epsilon: float | None = None,
        momentum: float | None = None,
        training_mode: int | None = None,
        spatial: int | None = None,
        is_test: int | None = None,
    ) -> tuple[np.ndarray]:
        if training_mode:
            raise UnsupportedModelError(
                "BatchNormalization with training_mode=1 is a training graph; export the model "
                "in inference mode (training_mode=0)"
            )
        eps = 1e-5 if epsilon is None else float(epsilon)
        # spatial=0 (opsets < 9) gives per-element statistics [C, D1, ...]; the usual [C]
        # statistics broadcast over the spatial axes.
        shape = (-1,) + (1,) * (x.ndim - 2)

        def per_channel(v: np.ndarray) -> np.ndarray:
            return v.reshape(shape) if v.ndim == 1 else v

        y = per_channel(scale) * (x - per_channel(mean)) / np.sqrt(
            per_channel(var) + eps
        ) + per_channel(bias)
        return (y.astype(x.dtype),)


REFERENCE_OPS: tuple[type[OpRun], ...] = (NbSmtConv, NbSmtMatMul)

#: Corrections of standard ``onnx.reference`` ops that :func:`reference_evaluator` installs.
STANDARD_OP_FIXES: tuple[type[OpRun], ...] = (BatchNormalization,)


def reference_evaluator(model: onnx.ModelProto | str | bytes, **kwargs: Any) -> ReferenceEvaluator:
    """A ``ReferenceEvaluator`` that runs NB-SMT graphs with the NumPy ops (no C++ library).

    Besides the NB-SMT ops it installs :data:`STANDARD_OP_FIXES`: an
    inference-mode ``BatchNormalization`` for every opset (see
    :class:`BatchNormalization`). ``new_ops`` given by the caller win over
    these (``ReferenceEvaluator`` keeps the first class per op name).
    """
    extra = list(kwargs.pop("new_ops", None) or [])
    return ReferenceEvaluator(model, new_ops=[*extra, *REFERENCE_OPS, *STANDARD_OP_FIXES], **kwargs)
