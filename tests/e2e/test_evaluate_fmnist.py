"""``evaluate`` on the Fashion-MNIST ResNet (models/fashion_mnist) against independent computations.

The data come from the project's own script (Debian's dataset-fashion-mnist):
a small seeded calibration sample of training images and the first test
images, so each test runs in seconds on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from nbsmt_onnx import TransformConfig, transform
from nbsmt_onnx.api import evaluate
from nbsmt_onnx.calibration.data import model_inputs, open_calibration_data
from nbsmt_onnx.cli import main
from nbsmt_onnx.config import ImagePreprocessing, RecalibrationConfig
from nbsmt_onnx.errors import ConfigError
from nbsmt_onnx.evaluate import (
    EXIT_OK,
    EXIT_THRESHOLD,
    EvaluateConfig,
    with_nbsmt_settings,
)
from nbsmt_onnx.report import add_stats_outputs, layer_metrics
from nbsmt_onnx.runtime.session import SessionOptions, create_session

REPO = Path(__file__).resolve().parents[2]
FMNIST = REPO / "models" / "fashion_mnist" / "fmnist_resnet.onnx"
NUM_CALIB = 64
NUM_EVAL = 96

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


@pytest.fixture(scope="module")
def fm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """calib.npz / eval.npz (+ labels) written by models/fashion_mnist/data.py."""
    assert FMNIST.is_file(), f"{FMNIST} is missing"
    out = tmp_path_factory.mktemp("fmnist")
    subprocess.run(
        [
            sys.executable,
            str(REPO / "models" / "fashion_mnist" / "data.py"),
            "--out",
            str(out),
            "--num-calib",
            str(NUM_CALIB),
            "--num-eval",
            str(NUM_EVAL),
        ],
        check=True,
        capture_output=True,
    )
    return out


def _run(model: onnx.ModelProto, x: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    session = create_session(model, SessionOptions())
    return [np.asarray(v) for v in session.run(names, {"input": x})]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_attribute_edit_equals_a_fresh_transform(fm_data: Path) -> None:
    """The sweep's shortcut: the T=1 model with new attributes is what transform builds.

    (Without recalibration, like the sweep's non-recalibrated rows; recalibration is
    on by default and depends on the NB-SMT settings.)
    """
    off = RecalibrationConfig(enabled=False)
    cfg = TransformConfig(threads=1, num_samples=NUM_CALIB, collect_stats=False, recalibration=off)
    base = transform(FMNIST, fm_data / "calib.npz", cfg)
    for threads, mapping, reduce in ((2, "channel", "activations"), (4, "interleave", "weights")):
        fresh = transform(
            FMNIST,
            fm_data / "calib.npz",
            TransformConfig(
                threads=threads,
                mapping=mapping,
                reduce=reduce,
                num_samples=NUM_CALIB,
                collect_stats=False,
                recalibration=off,
            ),
        )
        edited = with_nbsmt_settings(base.sim_model, threads, mapping, reduce)
        assert edited.graph.SerializeToString() == fresh.sim_model.graph.SerializeToString()


def test_metrics_equal_an_independent_computation(fm_data: Path) -> None:
    config = EvaluateConfig(
        rows=("float32", "int8", "nbsmt"),
        threads=(2,),
        transform=TransformConfig(num_samples=NUM_CALIB, batch_size=16),
        eval_batch_size=20,  # 96 = 4 x 20 + 16: a ragged last batch
        layer_samples=NUM_EVAL,  # all samples, so the per-layer sums do not depend on the order
    )
    result = evaluate(
        FMNIST, fm_data / "eval.npz", fm_data / "calib.npz", config,
        labels=fm_data / "eval_labels.npy",
    )  # fmt: skip
    assert [r.id for r in result.rows] == ["float32", "int8", "nbsmt-t2-channel-activations"]
    assert result.eval_data["samples"] == NUM_EVAL and result.calib_data["samples"] == NUM_CALIB
    assert result.output == "logits" and result.output_kind == "logits"
    assert result.duplicates == 0 and result.passed

    x = np.load(fm_data / "eval.npz")["input"]
    y = np.load(fm_data / "eval_labels.npy")
    float_out = _run(onnx.load(FMNIST), x)[0]
    t2 = transform(
        FMNIST,
        fm_data / "calib.npz",
        TransformConfig(
            threads=2,
            num_samples=NUM_CALIB,
            batch_size=16,
            collect_stats=False,
            recalibration=RecalibrationConfig(enabled=False),  # the row is not recalibrated
        ),
    ).sim_model
    probe, stats_names = add_stats_outputs(t2)
    nodes = [n for n in t2.graph.node if n.domain == "nbsmt"]
    layer_tensors = [n.output[0] for n in nodes]
    for t in layer_tensors:
        probe.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    names = ["logits", *stats_names.values(), *layer_tensors]
    values = _run(probe, x, names)
    t2_out = values[0]
    stats = dict(zip(stats_names, values[1 : 1 + len(stats_names)], strict=True))
    t2_layers = values[1 + len(stats_names) :]
    int8_model = with_nbsmt_settings(t2, 1, "channel", "activations")
    for t in layer_tensors:
        int8_model.graph.output.append(
            helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
        )
    int8_values = _run(int8_model, x, ["logits", *layer_tensors])

    fl, i8, nb = result.rows
    # top-1/top-5 are counts over the same samples: exact
    assert fl.metrics["top1"] == np.mean(np.argmax(float_out, axis=1) == y)
    top5 = np.argsort(-float_out, axis=1, kind="stable")[:, :5]
    assert fl.metrics["top5"] == np.mean([y[i] in top5[i] for i in range(NUM_EVAL)])
    assert nb.metrics["top1"] == np.mean(np.argmax(t2_out, axis=1) == y)
    assert i8.metrics["top1"] == np.mean(np.argmax(int8_values[0], axis=1) == y)
    # fidelity metrics: float64 sums in a different order (per batch vs all at once)
    rel = 1e-9
    ref = float_out.astype(np.float64)
    out = t2_out.astype(np.float64)
    assert nb.metrics["agreement"] == np.mean(np.argmax(ref, 1) == np.argmax(out, 1))
    lp, lq = _log_softmax(ref), _log_softmax(out)
    kl = np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1))
    assert nb.metrics["kl"] == pytest.approx(kl, rel=rel)
    cos = np.mean(
        np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    )
    assert nb.metrics["cosine"] == pytest.approx(cos, rel=rel)
    sqnr = 10 * math.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))
    assert nb.metrics["sqnr_db"] == pytest.approx(sqnr, rel=rel)
    # per-layer NB-SMT statistics are integer sums: exact
    by_node = {entry["node"]: entry for entry in nb.layers}
    assert set(by_node) == {n.name for n in nodes}
    for node, s in stats.items():
        assert by_node[node]["nbsmt"] == layer_metrics(s, 2)
    # per-layer output SQNR vs int8
    for node, a, b in zip(nodes, int8_values[1:], t2_layers, strict=True):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        noise = np.sum((a64 - b64) ** 2)
        expected = math.inf if noise == 0 else 10 * math.log10(np.sum(a64**2) / noise)
        got = by_node[node.name]["sqnr_vs_int8_db"]
        assert got == pytest.approx(expected, rel=rel), node.name
        assert by_node[node.name]["sqnr_samples"] == NUM_EVAL
    # the first conv has one input channel: with channel mapping one thread is idle,
    # so NB-SMT computes exactly int8 there
    assert by_node[nodes[0].name]["sqnr_vs_int8_db"] == math.inf

    # --- uncertainty, from the independently computed per-sample values
    z = 1.959963984540054

    def wilson(k: int, n: int) -> tuple[float, float]:  # roots of (k/n - p)^2 = z^2 p(1-p)/n
        a, b, c = 1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2
        disc = math.sqrt(max(0.0, b * b - 4 * a * c))
        return (-b - disc) / (2 * a), (-b + disc) / (2 * a)

    fl_hit = np.argmax(float_out, axis=1) == y
    nb_hit = np.argmax(t2_out, axis=1) == y
    i8_hit = np.argmax(int8_values[0], axis=1) == y
    for row, hits in ((fl, fl_hit), (nb, nb_hit), (i8, i8_hit)):
        iv = row.intervals["top1"]
        assert iv is not None
        lo, hi = wilson(int(hits.sum()), NUM_EVAL)
        # float64 closed forms of the same roots (ends at 0 / 1 are exact in both)
        assert iv.lo == pytest.approx(lo, abs=1e-12) and iv.hi == pytest.approx(hi, abs=1e-12)
    assert fl.intervals["agreement"] is None and fl.difference == dict.fromkeys(fl.difference)
    d = nb.difference["top1"]
    assert nb.reference == "float32" and d is not None
    assert (d.row_only, d.reference_only) == (
        int(np.sum(nb_hit & ~fl_hit)),
        int(np.sum(~nb_hit & fl_hit)),
    )
    assert d.estimate == pytest.approx(nb_hit.mean() - fl_hit.mean(), abs=1e-15)
    # KL / SQNR: the documented bootstrap re-done with explicit index draws (the library
    # uses count matrices): resamples of n indices from default_rng(seed), order statistics
    # per-sample values are kept in evaluation order: the seeded draw of the data
    order = np.asarray(
        open_calibration_data(
            fm_data / "eval.npz", model_inputs(onnx.load(FMNIST)), num_samples=NUM_EVAL,
            batch_size=20, seed=config.eval_seed,
        ).indices
    )  # fmt: skip
    assert sorted(order) == list(range(NUM_EVAL))
    kl_i = np.sum(np.exp(lp) * (lp - lq), axis=1)[order]
    sig_i, noi_i = np.sum(ref**2, axis=1)[order], np.sum((ref - out) ** 2, axis=1)[order]
    idx = np.random.default_rng(config.bootstrap_seed).integers(
        0, NUM_EVAL, size=(config.bootstrap_resamples, NUM_EVAL)
    )
    k = int(config.bootstrap_resamples * 0.025)
    boot_kl = np.sort(kl_i[idx].mean(axis=1))
    boot_sqnr = np.sort(10 * np.log10(sig_i[idx].sum(axis=1) / noi_i[idx].sum(axis=1)))
    kl_iv, sqnr_iv = nb.intervals["kl"], nb.intervals["sqnr_db"]
    assert kl_iv is not None and sqnr_iv is not None
    # sums of 96 float64 terms in another order: 1e-9 relative
    assert kl_iv.lo == pytest.approx(boot_kl[k], rel=1e-9)
    assert kl_iv.hi == pytest.approx(boot_kl[-1 - k], rel=1e-9)
    assert sqnr_iv.lo == pytest.approx(boot_sqnr[k], rel=1e-9)
    assert sqnr_iv.hi == pytest.approx(boot_sqnr[-1 - k], rel=1e-9)
    assert kl_iv.lo < nb.metrics["kl"] < kl_iv.hi
    # vs float32 the KL difference is the row's KL (float32's KL with itself is 0)
    kl_d = nb.difference["kl"]
    assert kl_d is not None and kl_d.interval.lo == pytest.approx(kl_iv.lo, rel=1e-12)
    assert nb.difference["sqnr_db"] is None  # float32 vs itself has no finite SQNR


def test_recalibrated_rows_and_subset(fm_data: Path) -> None:
    # The guard off: this is about the rows' plumbing, so recalibration must change the model
    # (with 64 calibration samples the guard may keep nothing; tests/e2e/test_guard_transform.py).
    config = EvaluateConfig(
        threads=(4,),
        transform=TransformConfig(
            num_samples=NUM_CALIB, batch_size=32, recalibration=RecalibrationConfig(guard=False)
        ),
        eval_samples=48,
        eval_seed=3,
        layer_samples=16,
    )
    result = evaluate(FMNIST, fm_data / "eval.npz", fm_data / "calib.npz", config)
    ids = [r.id for r in result.rows]
    assert ids == [
        "float32",
        "int8",
        "nbsmt-t4-channel-activations",
        "nbsmt-t4-channel-activations-recal",
    ]
    assert result.labels is None and result.eval_data["samples"] == 48
    plain, recal = result.rows[2], result.rows[3]
    assert recal.available and recal.recalibrated and recal.prepare_s > 0
    assert recal.recalibration is not None and recal.recalibration["batchnorms"]
    assert recal.metrics["top1"] is None and recal.metrics["agreement"] is not None
    assert recal.metrics["sqnr_db"] != plain.metrics["sqnr_db"]
    # folded recalibrated ops write the BN outputs: compared with the int8 BN outputs
    assert sum(e["sqnr_vs_int8_db"] is not None for e in recal.layers) >= len(recal.layers) - 1
    data = json.loads(result.to_json())
    assert data["rows"][3]["recalibration"]["strategy"] == "relative"
    # what recalibration did: the +recal row minus the same row without, paired
    assert recal.unrecalibrated == plain.id and plain.unrecalibrated is None
    assert plain.recalibration_effect == {} and data["rows"][2]["recalibration_effect"] is None
    effect = recal.recalibration_effect
    agree, sqnr = effect["agreement"], effect["sqnr_db"]
    assert agree is not None and sqnr is not None and effect["top1"] is None  # no labels
    assert agree.estimate == pytest.approx(
        recal.metrics["agreement"] - plain.metrics["agreement"], abs=1e-15
    )
    # discordant pairs: at most the samples on which either row disagrees with float32
    disagree = round(48 * (2 - recal.metrics["agreement"] - plain.metrics["agreement"]))
    assert agree.row_only + agree.reference_only <= disagree
    assert sqnr.estimate == pytest.approx(
        recal.metrics["sqnr_db"] - plain.metrics["sqnr_db"], abs=1e-9
    )
    assert sqnr.interval.contains(sqnr.estimate)
    table = result.format_table()
    assert "recalibration effect (+recal row - the same row without recalibration" in table
    assert data["rows"][3]["recalibration_effect"]["reference"] == plain.id
    lines = result.to_csv().splitlines()
    header, recal_line = lines[0].split(","), lines[4].split(",")
    cells = dict(zip(header, recal_line, strict=True))
    assert cells["unrecalibrated"] == plain.id
    assert float(cells["recal_agreement"]) == agree.estimate
    assert float(cells["recal_sqnr_db_lo"]) == sqnr.interval.lo


def test_random_calibration_marks_recalibrated_rows_unavailable(fm_data: Path) -> None:
    config = EvaluateConfig(
        threads=(2,), transform=TransformConfig(num_samples=16), eval_samples=16, layer_samples=0
    )
    result = evaluate(FMNIST, fm_data / "eval.npz", "random", config)
    recal = result.row("nbsmt-t2-channel-activations-recal")
    assert not recal.available and "random calibration data" in (recal.note or "")
    assert all(v is None for v in recal.metrics.values())
    assert any("unavailable" in w for w in result.warnings)
    with pytest.raises(ConfigError, match="cannot be computed: random calibration data"):
        evaluate(
            FMNIST,
            fm_data / "eval.npz",
            "random",
            EvaluateConfig(rows=("float32", "nbsmt+recal"), threads=(2,), eval_samples=8),
        )


def test_duplicates_between_calibration_and_evaluation_are_warned(
    fm_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = np.load(fm_data / "eval.npz")["input"]
    calib = tmp_path / "calib_with_eval.npz"
    np.savez(calib, input=np.concatenate([np.load(fm_data / "calib.npz")["input"][:20], x[:5]]))
    config = EvaluateConfig(
        rows=("float32", "int8"), transform=TransformConfig(num_samples=25), layer_samples=0
    )
    with caplog.at_level(logging.WARNING, logger="nbsmt_onnx.evaluate"):
        result = evaluate(FMNIST, fm_data / "eval.npz", calib, config)
    assert result.duplicates == 5
    assert "5 evaluation sample(s) also occur in the calibration data" in caplog.text
    assert "also occur in the calibration data" in result.format_table()


def test_image_class_folders(fm_data: Path, tmp_path: Path) -> None:
    """--labels folders on PNG class folders, preprocessed like the training data."""
    image_mod = pytest.importorskip("PIL.Image")
    spec = importlib.util.spec_from_file_location(
        "fmnist_data_for_test", REPO / "models" / "fashion_mnist" / "data.py"
    )
    assert spec is not None and spec.loader is not None
    fm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fm)  # the project's reader, not a copy
    MEAN, STD = fm.MEAN, fm.STD
    images, labels = fm.load_split("test")
    root = tmp_path / "images"
    for i in range(30):
        folder = root / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        image_mod.fromarray(images[i]).save(folder / f"{i:03d}.png")
    pre = ImagePreprocessing(mean=(MEAN,), std=(STD,))
    config = EvaluateConfig(rows=("float32", "int8"), layer_samples=0)
    result = evaluate(FMNIST, root, fm_data / "calib.npz", config, labels="folders", images=pre)
    x = ((images[:30].astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD))[
        :, None
    ]
    expected = np.mean(np.argmax(_run(onnx.load(FMNIST), x)[0], axis=1) == labels[:30])
    assert result.rows[0].metrics["top1"] == expected
    assert result.labels == f"class folders of {root}"


def test_cli_json_csv_report_and_exit_codes(fm_data: Path, tmp_path: Path) -> None:
    base = [
        "evaluate", str(FMNIST), "--data", str(fm_data / "eval.npz"),
        "--labels", str(fm_data / "eval_labels.npy"), "--calib", str(fm_data / "calib.npz"),
        "--rows", "float32,int8,nbsmt", "--threads", "4", "--num-samples", "32",
        "--eval-samples", "64", "--layer-samples", "16",
    ]  # fmt: skip
    runner = CliRunner()
    csv_path, html_path = tmp_path / "t.csv", tmp_path / "r.html"
    res = runner.invoke(main, [*base, "--json", "--csv", str(csv_path), "--report", str(html_path)])
    assert res.exit_code == EXIT_OK, res.output
    data = json.loads(res.stdout)  # stdout is the JSON and nothing else
    assert data["gate"] == {"passed": True, "exit_code": 0, "bound": "point", "checks": []}
    assert [r["id"] for r in data["rows"]] == ["float32", "int8", "nbsmt-t4-channel-activations"]
    assert csv_path.read_text().count("\n") == 4
    header = csv_path.read_text().splitlines()[0].split(",")
    for col in ("top1_lo", "top1_hi", "agreement_lo", "kl_hi", "reference", "diff_top1_p",
                "diff_kl_lo", "diff_sqnr_db_hi"):  # fmt: skip
        assert col in header
    t4 = data["rows"][2]
    assert t4["intervals"]["agreement"]["method"] == "wilson"
    assert t4["difference"]["reference"] == "float32"
    assert t4["difference"]["metrics"]["top1"]["method"] == "newcombe-paired"
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    agreement = data["rows"][2]["metrics"]["agreement"]
    assert agreement < 1.0, "T=4 is expected to flip at least one of 64 predictions"

    # a threshold the T=4 row misses -> exit 3, JSON still complete
    res = runner.invoke(main, [*base, "--json", "--min-agreement", "1.0", "--gate", "nbsmt"])
    assert res.exit_code == EXIT_THRESHOLD, res.output
    data = json.loads(res.stdout)
    (check,) = data["gate"]["checks"]
    assert check["row"] == "nbsmt-t4-channel-activations" and not check["passed"]
    assert check["value"] == agreement

    # thresholds met -> exit 0; the table is printed without --json
    res = runner.invoke(main, [*base, "--max-drop", "100", "--min-agreement", "0"])
    assert res.exit_code == EXIT_OK, res.output
    assert "gate: passed (2 check(s))" in res.stdout
    assert "top-1 % [95% CI]" in res.stdout and "difference to float32" in res.stdout

    # a threshold between the agreement's Wilson lower bound and its point estimate:
    # passes on the point estimate, fails on the pessimistic bound
    lo = t4["intervals"]["agreement"]["lo"]
    middle = f"{(agreement + lo) / 2:.6f}"
    res = runner.invoke(main, [*base, "--min-agreement", middle, "--gate", "nbsmt"])
    assert res.exit_code == EXIT_OK, res.output
    res = runner.invoke(
        main, [*base, "--min-agreement", middle, "--gate", "nbsmt", "--gate-bound", "pessimistic"]
    )
    assert res.exit_code == EXIT_THRESHOLD, res.output
    assert "its 95% lower bound" in res.stdout

    # outputs are checked before the run: an existing file without --force is a user error
    res = runner.invoke(main, [*base, "--csv", str(csv_path)])
    assert res.exit_code == 2 and "exists" in res.output


def test_python_api_with_feed_dicts_and_label_array(fm_data: Path) -> None:
    """nbsmt_onnx.evaluate(...) takes feed dicts (in order) with a label array in the same order."""
    import nbsmt_onnx

    x = np.load(fm_data / "eval.npz")["input"][:30]
    y = np.load(fm_data / "eval_labels.npy")[:30]
    feeds = [{"input": x[i : i + 10]} for i in range(0, 30, 10)]
    result = nbsmt_onnx.evaluate(
        FMNIST,
        feeds,
        {"input": np.load(fm_data / "calib.npz")["input"]},
        nbsmt_onnx.EvaluateConfig(rows=("float32", "int8"), layer_samples=0),
        labels=y,
    )
    expected = np.mean(np.argmax(_run(onnx.load(FMNIST), x)[0], axis=1) == y)
    assert result.rows[0].metrics["top1"] == expected
    assert result.eval_data["samples"] == 30 and result.labels == "array"
