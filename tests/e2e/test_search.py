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
from nbsmt_onnx.errors import ConfigError, OutputError
from nbsmt_onnx.graph.threads import nbsmt_nodes, node_threads
from nbsmt_onnx.search import SearchConfig, SearchResult, search

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


def _search(files: dict[str, Path], seed: int = 0, **kw: object) -> SearchResult:
    config = SearchConfig(transform=nb.TransformConfig(num_samples=64, seed=seed), **kw)  # type: ignore[arg-type]
    return search(files["model"], files["calib"], files["eval"], config)


def _hand_speedup(threads: dict[str, int]) -> float:
    return sum(MACS.values()) / sum(MACS[n] / threads[n] for n in MACS)


@pytest.fixture(scope="module")
def searched(files: dict[str, Path]) -> SearchResult:
    return _search(files, max_drop=1.0)


def test_a_huge_budget_moves_every_layer_to_the_highest_choice(files: dict[str, Path]) -> None:
    result = _search(files, max_drop=100.0)
    assert result.met_budget and result.exit_code == 0
    assert result.best.threads == dict.fromkeys(MACS, 4)
    assert result.best.speedup == pytest.approx(4.0)
    model_threads = {n.name: node_threads(n) for n in nbsmt_nodes(result.transform.sim_model)}
    assert model_threads == dict.fromkeys(MACS, 4)
    # the chain's end and uniform T=4 are the same assignment: one row of the table, chosen
    all4 = [r for r in result.pareto_table() if r["threads"] == dict.fromkeys(MACS, 4)]
    assert len(all4) == 1 and all4[0]["chosen"] and all4[0]["status"] == "evaluated"


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


def test_the_same_seeds_give_the_same_plan(files: dict[str, Path]) -> None:
    # calibration subset (seed 3) and evaluation subset (eval_seed 5) both drawn at random
    kw: dict[str, object] = {"max_drop": 1.0, "eval_samples": 200, "eval_seed": 5}
    a = SearchConfig(transform=nb.TransformConfig(num_samples=48, seed=3), **kw)  # type: ignore[arg-type]
    first = search(files["model"], files["calib"], files["eval"], a)
    second = search(files["model"], files["calib"], files["eval"], a)
    one, two = first.report(), second.report()
    one.pop("wall_time_s"), two.pop("wall_time_s")
    assert one == two
    assert first.layer_threads() == second.layer_threads()


def test_every_speedup_is_the_mac_weighted_figure_of_hand_counted_macs(
    searched: SearchResult,
) -> None:
    assert {layer.name: layer.macs for layer in searched.layers} == MACS
    for c in searched.tried:
        assert c.speedup == pytest.approx(_hand_speedup(c.threads), rel=1e-12), c.label
    for step in searched.chain:
        assert step.speedup == pytest.approx(_hand_speedup(step.threads), rel=1e-12)
    # the formula on numbers written out: 6912 + 1152 + 20 = 8084 MACs per sample
    assert MACS == {"conv1": 6912, "conv2": 1152, "fc": 20}
    mixed = {"conv1": 4, "conv2": 2, "fc": 1}
    assert _hand_speedup(mixed) == pytest.approx(8084 / (1728 + 576 + 20))


def test_report_json_holds_plan_pareto_table_and_verified_accuracy(
    searched: SearchResult, tmp_path: Path
) -> None:
    path = searched.write_report(tmp_path / "search.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "nbsmt-onnx/search-report"
    assert doc["search_data"]["samples"] == 300 and doc["model"].endswith("model.onnx")
    # every layer: threads, MACs, sensitivity per higher choice
    assert [layer["name"] for layer in doc["layers"]] == list(MACS)
    for layer in doc["layers"]:
        assert layer["macs"] == MACS[layer["name"]] and layer["threads"] in (1, 2, 4)
        assert set(layer["sensitivity"]) == {"2", "4"}
        assert layer["threads"] == doc["final"]["threads"][layer["name"]]
    # the verified final accuracy with its interval
    final = doc["final"]
    assert final["verified"] is True and final["label"] == searched.best.label
    assert final["metric"] == pytest.approx(searched.best.score.metric)
    lo, hi = final["interval"]
    assert lo <= final["metric"] <= hi
    assert final["drop_interval"][0] <= final["drop"] <= final["drop_interval"][1]
    # the Pareto table: every verified assignment measured, the chain's others predicted
    table = doc["pareto_table"]
    assert [r["speedup"] for r in table] == sorted(r["speedup"] for r in table)
    evaluated = [r for r in table if r["status"] == "evaluated"]
    predicted = [r for r in table if r["status"] == "predicted"]
    distinct = {tuple(sorted(c.threads.items())) for c in searched.tried}
    assert len(evaluated) == len(distinct)  # an assignment measured twice is one row
    assert {tuple(sorted(r["threads"].items())) for r in table} >= distinct
    for r in evaluated:
        assert r["interval"][0] <= r["metric"] <= r["interval"][1]
        assert r["speedup"] == pytest.approx(_hand_speedup(r["threads"]), rel=1e-12)
    for r in predicted:
        assert r["interval"] is None and r["drop"] == r["predicted_drop"]
        assert r["metric"] == pytest.approx(doc["reference_metric"] - r["predicted_drop"])
    steps = {r["step"] for r in table if r["step"] is not None}
    assert steps == set(range(len(searched.chain)))  # every chain step is in the table
    chosen = [r for r in table if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["threads"] == searched.best.threads
    assert chosen[0]["status"] == "evaluated"
    assert {r["label"] for r in evaluated if r["pareto"]} == {c.label for c in searched.pareto()}


def test_report_html_plots_the_front_and_the_sensitivities(
    searched: SearchResult, tmp_path: Path
) -> None:
    path = searched.write_report(tmp_path / "search.html")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "nbsmt-onnx search report" in page
    assert page.count('<img class="plot"') == 2
    assert 'alt="Pareto front: speed-up vs' in page and 'alt="per-layer sensitivity"' in page
    for name in MACS:
        assert name in page
    assert f"{searched.best.speedup:.2f}&times;" in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained
    with pytest.raises(OutputError):
        searched.write_report(path)  # no overwrite without force
    searched.write_report(path, force=True)
    with pytest.raises(ConfigError, match="unknown report format"):
        searched.write_report(tmp_path / "search.txt")


def test_cli_writes_model_and_plan_and_exits_3_when_nothing_fits(
    files: dict[str, Path], tmp_path: Path
) -> None:
    out, plan = tmp_path / "m.onnx", tmp_path / "plan.json"
    args = ["search", str(files["model"]), "--calib", str(files["calib"]), "--data",
            str(files["eval"]), "--num-samples", "64", "-o", str(out), "--plan", str(plan)]  # fmt: skip
    report = tmp_path / "search.html"
    ok = CliRunner().invoke(main, [*args, "--max-drop", "100", "--report", str(report)])
    assert ok.exit_code == 0, ok.output
    assert f"wrote {report}" in ok.output and "Pareto front" in report.read_text()
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


def test_cli_refuses_an_unknown_report_suffix_before_searching(
    files: dict[str, Path], tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, [
        "search", str(files["model"]), "--calib", str(files["calib"]), "--data", str(files["eval"]),
        "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "search.txt"),
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "unknown report format" in result.output and not (tmp_path / "m.onnx").exists()


def test_a_second_budget_reuses_the_first_search_and_finds_the_same(
    files: dict[str, Path], searched: SearchResult
) -> None:
    fresh = _search(files, max_drop=3.0)
    again = search(
        files["model"], files["calib"], files["eval"],
        SearchConfig(transform=nb.TransformConfig(num_samples=64), max_drop=3.0),
        reuse=searched,
    )  # fmt: skip
    assert again.best.threads == fresh.best.threads
    assert again.best.score == fresh.best.score
    assert [c.to_dict() for c in again.tried] == [c.to_dict() for c in fresh.tried]
    assert again.layers == fresh.layers
    # base, float and every sensitivity are taken over; only new chain prefixes are built
    assert again.reused_evaluations >= 2 + 2 * len(MACS)
    assert again.model_evaluations + again.reused_evaluations == fresh.model_evaluations
    assert again.plan()["reused_evaluations"] == again.reused_evaluations
    uniform4 = next(c for c in again.tried if c.label == "uniform T=4")
    assert all(node_threads(n) == 4 for n in nbsmt_nodes(again.built(uniform4).sim_model))


def test_reuse_refuses_another_configuration(
    files: dict[str, Path], searched: SearchResult
) -> None:
    other = SearchConfig(transform=nb.TransformConfig(num_samples=32), max_drop=1.0)
    with pytest.raises(ConfigError, match="reuse"):
        search(files["model"], files["calib"], files["eval"], other, reuse=searched)
    same = SearchConfig(transform=nb.TransformConfig(num_samples=64), max_drop=5.0)
    with pytest.raises(ConfigError, match="reuse"):  # other calibration data
        search(files["model"], files["eval"], files["eval"], same, reuse=searched)


def test_sensitivities_are_relative_to_the_base_whatever_the_reference(
    files: dict[str, Path], searched: SearchResult
) -> None:
    # the float32 reference is above the int8 base: the base's own drop enters each chain
    # step's prediction once, not once per moved layer
    config = SearchConfig(
        transform=nb.TransformConfig(num_samples=64), max_drop=1.0, reference="float32"
    )
    fresh = search(files["model"], files["calib"], files["eval"], config)
    reused = search(files["model"], files["calib"], files["eval"], config, reuse=searched)
    base_drop = fresh.tried[0].score.drop
    assert fresh.reference_metric == 100.0 and base_drop > 0
    assert searched.tried[0].score.drop == 0.0  # int8 reference: the base itself
    def sensitivities(r: SearchResult) -> dict[str, dict[int, float]]:
        return {layer.name: layer.sensitivity for layer in r.layers}

    assert sensitivities(fresh) == sensitivities(searched) == sensitivities(reused)
    for step, ref in zip(fresh.chain, searched.chain, strict=True):
        moved = [layer.sensitivity[step.threads[layer.name]]
                 for layer in fresh.layers if step.threads[layer.name] != 1]  # fmt: skip
        assert step.predicted_drop == pytest.approx(base_drop + sum(moved), abs=1e-9)
        assert step.predicted_drop == pytest.approx(ref.predicted_drop + base_drop, abs=1e-9)
    assert [c.to_dict() for c in reused.tried] == [c.to_dict() for c in fresh.tried]
    assert reused.model_evaluations < fresh.model_evaluations
