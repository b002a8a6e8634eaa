"""The C++ NB-SMT ops equal the NumPy reference integer for integer (SPEC.md §3.3).

Y is compared bit for bit (float32 bit patterns) and stats exactly. Random cases
are seeded: a failure prints each differing case with its seed, and
``conv_case(seed)`` / ``matmul_case(seed)`` in ops_cases.py rebuild it.
Many cases share one model (one node each) to keep session overhead low.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
from ops_cases import (
    Case,
    all_settings,
    build_model,
    check_cases,
    chunks,
    conv_case,
    gather_runs_conv_case,
    grouped_conv_case,
    large_conv_case,
    large_matmul_case,
    matmul_case,
    pointwise_conv_case,
    run_model,
    same_bits,
)

from nbsmt_onnx.ops import reference as ref
from nbsmt_onnx.ops import schema

CONV_CASES = 3000
MATMUL_CASES = 2000
LARGE_CONV_CASES = 300
LARGE_MATMUL_CASES = 400
GROUPED_CONV_CASES = 1000
POINTWISE_CONV_CASES = 600
CHUNK = 100


@pytest.mark.parametrize(
    "seeds", chunks(0, CONV_CASES, CHUNK), ids=lambda r: f"seeds{r.start}-{r.stop - 1}"
)
def test_conv_random(seeds: range) -> None:
    # alternate the runtime's thread count between chunks: results must not depend on it
    check_cases([conv_case(s) for s in seeds], intra_op_threads=1 + (seeds.start // CHUNK) % 2)


@pytest.mark.parametrize(
    "seeds", chunks(0, MATMUL_CASES, CHUNK), ids=lambda r: f"seeds{r.start}-{r.stop - 1}"
)
def test_matmul_random(seeds: range) -> None:
    check_cases([matmul_case(s) for s in seeds], intra_op_threads=1 + (seeds.start // CHUNK) % 2)


@pytest.mark.parametrize(
    "seeds", chunks(0, LARGE_CONV_CASES, 20), ids=lambda r: f"seeds{r.start}-{r.stop - 1}"
)
def test_large_conv_random(seeds: range) -> None:
    check_cases([large_conv_case(s) for s in seeds], intra_op_threads=2)


@pytest.mark.parametrize(
    "seeds", chunks(0, LARGE_MATMUL_CASES, 40), ids=lambda r: f"seeds{r.start}-{r.stop - 1}"
)
def test_large_matmul_random(seeds: range) -> None:
    check_cases([large_matmul_case(s) for s in seeds], intra_op_threads=2)


@pytest.mark.parametrize(
    "seeds", chunks(0, GROUPED_CONV_CASES, CHUNK), ids=lambda r: f"seeds{r.start}-{r.stop - 1}"
)
def test_grouped_conv_random(seeds: range) -> None:
    # depthwise / grouped convs: the direct kernel (or the GEMM path with stats or K > 512)
    check_cases(
        [grouped_conv_case(s) for s in seeds], intra_op_threads=1 + (seeds.start // CHUNK) % 2
    )


@pytest.mark.parametrize(
    "seeds", chunks(0, POINTWISE_CONV_CASES, CHUNK), ids=lambda r: f"seeds{r.start}-{r.stop - 1}"
)
def test_pointwise_conv_random(seeds: range) -> None:
    # 1x1 stride-1 convs (the pointwise kernel on AVX2) under 1, 2 and 4 runtime threads
    check_cases(
        [pointwise_conv_case(s) for s in seeds],
        intra_op_threads=(1, 2, 4)[(seeds.start // CHUNK) % 3],
    )


def test_pointwise_cases_cover_the_kernel() -> None:
    """The pointwise generator reaches every T = 1 / 2 setting without stats, position
    counts that are not multiples of the kernel's 16-position tiles, single and odd
    channel counts, several images, wide reductions, and the GEMM fallbacks."""
    seen: collections.Counter[str] = collections.Counter()
    for seed in range(POINTWISE_CONV_CASES):
        c = pointwise_conv_case(seed)
        x, wq = c.inputs[0], c.inputs[1]
        a = c.attributes
        if c.with_stats or a["threads"] == 4:
            seen["gemm path"] += 1
            continue
        seen[f"T={a['threads']} {a['mapping']} {a['reduce']} signed={a['act_signed']}"] += 1
        positions = math.prod(x.shape[2:])  # type: ignore[union-attr]
        seen["position tail"] += positions % 16 != 0
        seen["fewer than 16 positions"] += positions < 16
        seen["one channel"] += x.shape[1] == 1  # type: ignore[union-attr]
        seen["odd channels"] += x.shape[1] % 2 == 1  # type: ignore[union-attr]
        seen["K >= 100"] += x.shape[1] >= 100  # type: ignore[union-attr]
        seen["several images"] += x.shape[0] > 1  # type: ignore[union-attr]
        seen["outputs not a multiple of 6"] += wq.shape[0] % 6 != 0  # type: ignore[union-attr]
        seen[f"rank{x.ndim - 2}"] += 1  # type: ignore[union-attr]
    required = [f"T={s['threads']} {s['mapping']} {s['reduce']} signed={s['act_signed']}"
                for s in all_settings() if s["threads"] < 4]  # fmt: skip
    required += ["gemm path", "position tail", "fewer than 16 positions", "one channel"]
    required += ["odd channels", "K >= 100", "several images", "outputs not a multiple of 6"]
    required += ["rank1", "rank2", "rank3"]
    missing = [r for r in required if seen[r] == 0]
    assert not missing, f"never generated: {missing}"


def test_conv_cases_cover_the_small_dense_direct_path() -> None:
    """Dense convs (one group) with a reduction of at most 32 elements and no stats run
    through the direct kernel (nbsmt::kDirectSmallK), on shared planes when there are
    few (image, group) tasks; the random conv cases reach it at every thread count,
    with one and several images, and wider ones with 16+ outputs (GEMM when they collide)."""
    seen: collections.Counter[str] = collections.Counter()
    for seed in range(CONV_CASES):
        c = conv_case(seed)
        x, wq = c.inputs[0], c.inputs[1]
        a = c.attributes
        k = math.prod(wq.shape[1:])  # type: ignore[union-attr]
        if c.with_stats or a["group"] != 1 or k > 32:
            continue
        seen[f"T={a['threads']}"] += 1
        seen["several images"] += x.shape[0] > 1  # type: ignore[union-attr]
        seen["strided"] += any(v > 1 for v in a.get("strides", [1]))
        seen["16+ outputs"] += wq.shape[0] >= 16  # type: ignore[union-attr]
    required = ["T=1", "T=2", "T=4", "several images", "strided", "16+ outputs"]
    missing = [r for r in required if seen[r] == 0]
    assert not missing, f"never generated: {missing}"


@pytest.mark.parametrize("seeds", chunks(0, 60, 20), ids=lambda r: f"seeds{r.start}-{r.stop - 1}")
def test_gather_runs_conv_random(seeds: range) -> None:
    # T = 4 convs read as runs with per-pixel entry records, several blocks per row
    check_cases(
        [gather_runs_conv_case(s) for s in seeds],
        intra_op_threads=(1, 2, 4)[(seeds.start // 20) % 3],
    )


def test_grouped_cases_cover_the_direct_kernel() -> None:
    """The grouped generator reaches every setting on the direct kernel (no stats,
    K <= 512), depthwise and grouped, strided, dilated and padded, and also the GEMM
    fallbacks (stats requested, K > 512)."""
    seen: collections.Counter[str] = collections.Counter()
    for seed in range(GROUPED_CONV_CASES):
        c = grouped_conv_case(seed)
        x, wq = c.inputs[0], c.inputs[1]
        a = c.attributes
        c_g, ks = wq.shape[1], math.prod(wq.shape[2:])  # type: ignore[union-attr]
        if c.with_stats or c_g * ks > 512 or wq.shape[0] >= 16 * a["group"]:  # type: ignore[union-attr]
            seen["gemm path"] += 1
            seen["grouped gemm without stats"] += not c.with_stats and a["group"] > 1
            continue
        seen[f"T={a['threads']} {a['mapping']} {a['reduce']} signed={a['act_signed']}"] += 1
        seen["depthwise" if c_g == 1 else "grouped"] += 1
        seen[f"rank{x.ndim - 2}"] += 1  # type: ignore[union-attr]
        seen["strided"] += any(v > 1 for v in a["strides"])
        seen["dilated"] += any(v > 1 for v in a["dilations"])
        seen["padded"] += any(v > 0 for v in a.get("pads", [0]))
        seen["outputs per group > 1"] += wq.shape[0] > a["group"]  # type: ignore[union-attr]
    required = [f"T={s['threads']} {s['mapping']} {s['reduce']} signed={s['act_signed']}"
                for s in all_settings()]  # fmt: skip
    required += ["gemm path", "grouped gemm without stats", "depthwise", "grouped", "rank1", "rank2", "rank3", "strided"]
    required += ["dilated", "padded", "outputs per group > 1"]
    missing = [r for r in required if seen[r] == 0]
    assert not missing, f"never generated: {missing}"


def test_random_cases_cover_every_feature() -> None:
    """The seeded generators really produce every feature the tests claim to cover."""
    seen: collections.Counter[str] = collections.Counter()
    for seed in range(CONV_CASES):
        c = conv_case(seed)
        x, wq, _, _, bias = c.inputs
        a = c.attributes
        rank = x.ndim - 2  # type: ignore[union-attr]
        group = a["group"]
        c_g = wq.shape[1]  # type: ignore[union-attr]
        seen.update(
            [
                f"conv rank{rank}",
                f"conv auto_pad={a.get('auto_pad', 'default')}",
                f"conv T={a['threads']} {a['mapping']} {a['reduce']} signed={a['act_signed']}",
                f"conv kind={c.kind}",
                f"conv bias={bias is not None}",
                f"conv stats={c.with_stats}",
                f"conv batch>1={x.shape[0] > 1}",  # type: ignore[union-attr]
                f"conv runtime_weights={c.runtime_weights}",
                f"conv empty_bias_name={c.empty_bias_name}",
            ]
        )
        if group > 1 and c_g == 1:
            seen["conv depthwise"] += 1
        elif group > 1:
            seen["conv grouped"] += 1
        if c_g % a["threads"]:
            seen["conv C_g not divisible by T"] += 1
        if any(s > 1 for s in a.get("strides", [1])):
            seen["conv strided"] += 1
        if any(d > 1 for d in a.get("dilations", [1])):
            seen["conv dilated"] += 1
        if any(p > 0 for p in a.get("pads", [0])):
            seen["conv padded"] += 1
    for seed in range(MATMUL_CASES):
        c = matmul_case(seed)
        a = c.attributes
        seen.update(
            [
                f"matmul lead={c.inputs[0].ndim - 1}",  # type: ignore[union-attr]
                f"matmul T={a['threads']} {a['mapping']} {a['reduce']} signed={a['act_signed']}",
                f"matmul kind={c.kind}",
                f"matmul bias={c.inputs[4] is not None}",
                f"matmul stats={c.with_stats}",
                f"matmul empty_bias_name={c.empty_bias_name}",
            ]
        )
        if c.inputs[1].shape[0] % a["threads"]:  # type: ignore[union-attr]
            seen["matmul K not divisible by T"] += 1
    required = [f"conv rank{r}" for r in (1, 2, 3)]
    required += [f"conv auto_pad={p}" for p in (*schema.AUTO_PAD_CHOICES, "default")]
    required += [f"matmul lead={n}" for n in range(4)]
    for op in ("conv", "matmul"):
        required += [
            f"{op} T={s['threads']} {s['mapping']} {s['reduce']} signed={s['act_signed']}"
            for s in all_settings()
        ]
        required += [
            f"{op} kind={k}" for k in ("relu", "signed", "zeros", "saturating", "ties", "special")
        ]
        required += [f"{op} bias={b}" for b in (True, False)] + [
            f"{op} stats={b}" for b in (True, False)
        ]
    required += ["conv batch>1=True", "conv batch>1=False", "conv runtime_weights=True"]
    required += ["conv empty_bias_name=True", "matmul empty_bias_name=True"]
    required += [
        "conv depthwise",
        "conv grouped",
        "conv C_g not divisible by T",
        "matmul K not divisible by T",
    ]
    required += ["conv strided", "conv dilated", "conv padded"]
    missing = [r for r in required if seen[r] < 3]
    assert not missing, f"features hit fewer than 3 times: {missing}"


def _dense_case(op: str, seed: int, settings: dict[str, object], bias: bool, stats: bool) -> Case:
    """A fixed-geometry, ReLU-like (about 60% zeros) case for one attribute combination."""
    rng = np.random.default_rng([seed, 3])
    x_scale = np.array(0.05, np.float32)
    if op == schema.CONV:
        x = (np.abs(rng.normal(0, 4, (2, 7, 6, 5))) * (rng.random((2, 7, 6, 5)) > 0.6)).astype(
            np.float32
        )
        w = rng.integers(-127, 128, (6, 7, 3, 3)).astype(np.int8)
        attrs: dict[str, object] = {"pads": [1, 1, 1, 1]}
        m = 6
    else:
        x = (np.abs(rng.normal(0, 4, (3, 5, 37))) * (rng.random((3, 5, 37)) > 0.6)).astype(
            np.float32
        )
        w = rng.integers(-127, 128, (37, 6)).astype(np.int8)
        attrs = {}
        m = 6
    if settings["act_signed"]:
        x = x - np.float32(2) * (rng.random(x.shape) < 0.3).astype(np.float32) * x
    scale = rng.uniform(0.001, 0.01, m).astype(np.float32)
    b = rng.normal(0, 1, m).astype(np.float32) if bias else None
    return Case(op, seed, [x, w, x_scale, scale, b], {**attrs, **settings}, stats, "relu")


@pytest.mark.parametrize("op", schema.OP_TYPES)
def test_every_setting(op: str) -> None:
    """All 24 attribute combinations, each with and without bias and stats."""
    cases = [
        _dense_case(op, i, s, bias, stats)
        for i, (s, bias, stats) in enumerate(
            (s, b, st) for s in all_settings() for b in (False, True) for st in (False, True)
        )
    ]
    check_cases(cases, intra_op_threads=2)


def _large_k_cases() -> list[Case]:
    """K = 4608 with |x| = 255 and |w| = 127: float32 sums are exact only below 2^24."""
    cases = []
    k = 4608
    a = np.full((2, k), 255.0, np.float32)
    a[1, ::3] = 0.0  # some idle slots too
    b = np.full((k, 3), 127, np.int8)
    b[:, 1] = -127
    b[::2, 2] = -127
    conv_x = np.full((1, 512, 3, 3), 255.0, np.float32)
    conv_w = np.full((2, 512, 3, 3), 127, np.int8)
    conv_w[1, ::2] = -127
    for i, s in enumerate(all_settings()):
        if s["act_signed"]:
            continue  # 255 is out of the signed range; covered by the random cases
        cases.append(
            Case(
                schema.MATMUL,
                i,
                [a, b, np.array(1.0, np.float32), np.ones(3, np.float32), None],
                s,
                True,
                "large-k",
            )
        )
        cases.append(
            Case(
                schema.CONV,
                i,
                [conv_x, conv_w, np.array(1.0, np.float32), np.ones(2, np.float32), None],
                s,
                True,
                "large-k",
            )
        )
    return cases


def test_large_k_exact() -> None:
    cases = _large_k_cases()
    for c in cases:  # the reference itself is exact here: check one value by hand
        if c.op == schema.MATMUL and c.attributes["threads"] == 1:
            assert c.expected()[0][0, 0] == np.float32(4608 * 255 * 127)
    check_cases(cases, intra_op_threads=2)


def test_max_reduction_length_worst_case() -> None:
    """K = MAX_REDUCTION_LENGTH with the largest products the rules allow.

    threads=2, reduce=weights: every full step has two active threads, so every
    weight -127 becomes R(-127) = -128 while the activation 255 stays. K is odd, so
    the last step holds one active thread whose product stays exact (-127 * 255):
    |acc| = (K - 1) * 32640 + 32385, the largest value an int32 must hold.
    """
    k = schema.MAX_REDUCTION_LENGTH
    a = np.full((1, k), 255.0, np.float32)
    b = np.full((k, 1), -127, np.int8)
    cases = [
        Case(
            schema.MATMUL,
            0,
            [a, b, np.array(1.0, np.float32), np.ones(1, np.float32), None],
            {"threads": t, "mapping": m, "reduce": "weights"},
            True,
            "max-k",
        )
        for t in (2, 4)
        for m in schema.MAPPING_CHOICES
    ]
    worst = (k - 1) * 255 * 128 + 255 * 127 if k % 2 else k * 255 * 128
    assert worst <= 2**31 - 1
    assert cases[0].expected()[0][0, 0] == np.float32(-worst)
    check_cases(cases)


def test_reduction_length_over_limit_is_an_error() -> None:
    k = schema.MAX_REDUCTION_LENGTH + 1
    case = Case(
        schema.MATMUL,
        0,
        [
            np.ones((1, k), np.float32),
            np.ones((k, 1), np.int8),
            np.array(1.0, np.float32),
            np.ones(1, np.float32),
            None,
        ],
        {},
        False,
        "over-k",
    )
    model, feeds = build_model([case])
    with pytest.raises(Exception, match="case0_seed0"):
        run_model(model, feeds)


def test_threads_1_is_plain_int8() -> None:
    """T=1 in C++ equals the scale formula applied to plain int8 arithmetic."""
    cases, wants = [], []
    for seed in range(60):
        case = conv_case(seed) if seed % 2 else matmul_case(seed)
        case.attributes["threads"] = 1
        x, w, x_scale, w_scale, bias = case.inputs
        xq = ref.quantize_activations(x, x_scale, case.attributes["act_signed"])  # type: ignore[arg-type]
        if case.op == schema.CONV:
            geo = {k: v for k, v in case.attributes.items() if k in schema.CONV_ATTRIBUTES}
            acc = ref.int8_conv(xq, w, **geo)  # type: ignore[arg-type]
            scale = (np.float32(x_scale) * w_scale).reshape(1, -1, *[1] * (acc.ndim - 2))  # type: ignore[arg-type]
            shaped_bias = None if bias is None else bias.reshape(scale.shape)
        else:
            acc = ref.int8_matmul(xq, w)  # type: ignore[arg-type]
            scale = np.float32(x_scale) * w_scale  # type: ignore[operator]
            shaped_bias = bias
        want = (scale * acc.astype(np.float32)).astype(np.float32)
        if shaped_bias is not None:
            want = (want + shaped_bias).astype(np.float32)
        cases.append(case)
        wants.append(want)
    model, feeds = build_model(cases)
    got = run_model(model, feeds)
    bad = [
        c.describe()
        for i, (c, w) in enumerate(zip(cases, wants, strict=True))
        if not same_bits(got[f"c{i}_Y"], w)
    ]
    assert not bad, "T=1 differs from plain int8 arithmetic:\n" + "\n".join(bad)


def test_all_zero_input_gives_bias() -> None:
    cases = []
    for i, s in enumerate(all_settings()):
        c = _dense_case(schema.CONV if i % 2 else schema.MATMUL, i, s, bias=bool(i % 3), stats=True)
        c.inputs[0] = np.zeros_like(c.inputs[0])
        cases.append(c)
    model, feeds = build_model(cases)
    got = run_model(model, feeds)
    for i, c in enumerate(cases):
        y = got[f"c{i}_Y"]
        bias = c.inputs[4]
        want = (
            np.zeros_like(y)
            if bias is None
            else np.broadcast_to(
                bias.reshape([-1] + [1] * (y.ndim - 2)) if c.op == schema.CONV else bias, y.shape
            )
        )
        assert same_bits(y, want.astype(np.float32)), c.describe()
        stats = got[f"c{i}_stats"]
        assert stats[1:].tolist() == [0, 0, 0], c.describe()
        assert stats[0] == c.expected()[1][0] > 0, c.describe()


def test_stats_groups_count_steps() -> None:
    """groups = output elements x steps, with steps from the mapping (SPEC.md §3.4)."""
    x = np.ones((1, 5, 4, 4), np.float32)  # C_g = 5: channel blocks of ceil(5/T) channels
    w = np.ones((3, 5, 3, 3), np.int8)
    cases = [
        Case(
            schema.CONV,
            t,
            [x, w, np.array(1.0, np.float32), np.ones(3, np.float32), None],
            {"threads": t, "mapping": m},
            True,
            "ones",
        )
        for t in schema.THREADS_CHOICES
        for m in schema.MAPPING_CHOICES
    ]
    model, feeds = build_model(cases)
    got = run_model(model, feeds)
    for i, c in enumerate(cases):
        t, m = c.attributes["threads"], c.attributes["mapping"]
        steps = math.ceil(5 / t) * 9 if m == "channel" else math.ceil(45 / t)
        assert got[f"c{i}_stats"][0] == 3 * 2 * 2 * steps, c.describe()
