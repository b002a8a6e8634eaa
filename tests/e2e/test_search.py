"""``search``: the budget logic at its extremes, determinism, the verified result, the CLI.

Tiny models (three MAC layers), so every candidate is a real transform with
recalibration and a real evaluation, as in production.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from click.testing import CliRunner

import nbsmt_onnx as nb
from nbsmt_onnx.cli import main
from nbsmt_onnx.graph.threads import nbsmt_nodes, node_threads
from nbsmt_onnx.search import SearchConfig, search

# conv_relu_gemm(channels=4, size=8, classes=5) per sample (tests/unit/test_threads.py)
MACS = {"conv1": 4 * 8 * 8 * 27, "conv2": 4 * 4 * 4 * 18, "fc": 5 * 4}


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("search")
    onnx.save(tm.conv_relu_gemm(0), d / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.standard_normal((64, 3, 8, 8)).astype(np.float32))
    np.savez(d / "eval.npz", x=rng.standard_normal((300, 3, 8, 8)).astype(np.float32))
    return {"model": d / "model.onnx", "calib": d / "calib.npz", "eval": d / "eval.npz"}


def _search(files: dict[str, Path], **kw: object) -> nb.search.SearchResult:  # type: ignore[name-defined]
    config = SearchConfig(transform=nb.TransformConfig(num_samples=64), **kw)  # type: ignore[arg-type]
    return search(files["model"], files["calib"], files["eval"], config)


def test_a_huge_budget_moves_every_layer_to_the_highest_choice(files: dict[str, Path]) -> None:
    result = _search(files, max_drop=100.0)
    assert result.met_budget and result.exit_code == 0
    assert result.best.threads == dict.fromkeys(MACS, 4)
    assert result.best.speedup == pytest.approx(4.0)
    model_threads = {n.name: node_threads(n) for n in nbsmt_nodes(result.transform.sim_model)}
    assert model_threads == dict.fromkeys(MACS, 4)


def test_a_zero_budget_on_the_pessimistic_bound_keeps_the_reference(files: dict[str, Path]) -> None:
    # The upper end of a paired 95 % interval of a drop is > 0 for any finite sample, so no
    # assignment can prove a zero loss: nothing moves, and the exit code says so.
    result = _search(files, max_drop=0.0, bound="pessimistic")
    assert not result.met_budget and result.exit_code == 3
    assert result.best.threads == dict.fromkeys(MACS, 1) and result.best.speedup == 1.0
    assert {n.name: node_threads(n) for n in nbsmt_nodes(result.transform.sim_model)} == (
        dict.fromkeys(MACS, 1)
    )
    assert len(result.tried) > 3  # candidates were verified and all refused
    assert all(c.score.pessimistic_drop > 0 for c in result.tried if c.label != "uniform T=1")


def test_the_chosen_assignment_meets_the_budget_as_measured(files: dict[str, Path]) -> None:
    budget = 2.0
    result = _search(files, max_drop=budget)
    best = result.best
    if result.met_budget:
        assert best.score.drop <= budget
    # the figure is the MAC-weighted formula on the chosen threads
    expected = sum(MACS.values()) / sum(MACS[n] / best.threads[n] for n in MACS)
    assert best.speedup == pytest.approx(expected, rel=1e-12)
    # no verified assignment that meets the budget is faster than the chosen one
    faster = [c for c in result.tried if c.speedup > best.speedup + 1e-9 and c.score.drop <= budget]
    assert faster == []
    plan = result.plan()
    assert {layer["name"] for layer in plan["layers"]} == set(MACS)
    assert all(set(layer["sensitivity"]) == {"2", "4"} for layer in plan["layers"])


def test_search_is_deterministic(files: dict[str, Path]) -> None:
    a = _search(files, max_drop=1.0).plan()
    b = _search(files, max_drop=1.0).plan()
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b


def test_cli_writes_model_and_plan_and_exits_3_when_nothing_fits(
    files: dict[str, Path], tmp_path: Path
) -> None:
    out, plan = tmp_path / "m.onnx", tmp_path / "plan.json"
    args = ["search", str(files["model"]), "--calib", str(files["calib"]), "--data",
            str(files["eval"]), "--num-samples", "64", "-o", str(out), "--plan", str(plan)]  # fmt: skip
    ok = CliRunner().invoke(main, [*args, "--max-drop", "100"])
    assert ok.exit_code == 0, ok.output
    assert "chosen: uniform T=4, speed-up 4.00x" in ok.output
    doc = json.loads(plan.read_text())
    assert doc["best"]["threads"] == dict.fromkeys(MACS, 4) and doc["met_budget"] is True
    assert {n.name: node_threads(n) for n in nbsmt_nodes(onnx.load(out))} == dict.fromkeys(MACS, 4)
    none = CliRunner().invoke(main, [*args, "--max-drop", "0", "--bound", "pessimistic", "--force"])
    assert none.exit_code == 3, none.output
    assert "NO assignment met the budget" in none.output
    assert out.exists() and json.loads(plan.read_text())["met_budget"] is False


def test_top1_needs_labels(files: dict[str, Path]) -> None:
    with pytest.raises(nb.NbsmtError, match="needs --labels"):
        _search(files, metric="top1")
