"""The HTML reports render in headless Chromium: no script or console errors, images decode, pixels drawn.

Chromium is a test dependency (Debian ``chromium``, installed by
scripts/setup.sh): when it is missing these tests FAIL, they do not skip.

Two Chromium runs per page, both writing only inside ``tmp_path``
(profile, HOME, caches):

1. ``--dump-dom`` of a copy of the page with a probe script injected at the
   top of ``<head>``: it records uncaught errors, failed resource loads
   (capture-phase ``error`` events) and ``console.error`` calls, and on
   ``load`` writes them, with the number of images and of images that did
   not decode, into a ``<pre id="render-probe">`` element that the dumped
   DOM carries back;
2. ``--screenshot`` of the unmodified page with ``--enable-logging=stderr``:
   the page itself has no scripts, so any ``CONSOLE`` line on stderr is a
   problem; the PNG is decoded with matplotlib (no Pillow needed) and must
   not be blank.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nbsmt_onnx import RecalibrationConfig, TransformConfig, transform
from nbsmt_onnx.api import evaluate
from nbsmt_onnx.config import EvaluateConfig
from nbsmt_onnx.html_report import render_html

REPO = Path(__file__).resolve().parents[2]
FMNIST = REPO / "models" / "fashion_mnist" / "fmnist_resnet.onnx"
WIDTH, HEIGHT = 1200, 2000
TIMEOUT_S = 180

pytestmark = pytest.mark.slow

PROBE = """<script>
window.__renderErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__renderErrors.push(e.message ? "error: " + e.message
      : "failed to load " + String((t && (t.src || t.href)) || "resource").slice(0, 60));
}, true);
var __consoleError = console.error;
console.error = function () {
  window.__renderErrors.push("console.error: " + Array.prototype.join.call(arguments, " "));
  __consoleError.apply(console, arguments);
};
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement("pre");
  out.id = "render-probe";
  out.textContent = JSON.stringify({errors: window.__renderErrors, images: imgs.length,
      broken: broken.length, tables: document.querySelectorAll("table").length,
      height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "chromium is not installed: apt-get install chromium (scripts/setup.sh installs it)",
        pytrace=False,
    )


def _run_chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    home = tmp / "chromium-home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
    }
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def check_renders(page_html: str, tmp: Path, name: str) -> dict[str, Any]:
    """Render ``page_html`` twice (probe + screenshot); assert it renders cleanly; return the probe."""
    page = tmp / f"{name}.html"
    page.write_text(page_html, encoding="utf-8")
    probed = tmp / f"{name}.probe.html"
    assert "<head>" in page_html
    probed.write_text(page_html.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")

    dom = _run_chromium(["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], tmp)
    match = re.search(r'<pre id="render-probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"the probe did not run (chromium exit {dom.returncode}): {dom.stderr[-2000:]}"
    probe = json.loads(html.unescape(match.group(1)))
    assert probe["errors"] == [], probe["errors"]
    assert probe["images"] > 0 and probe["broken"] == 0, probe
    assert probe["tables"] > 0

    shot = tmp / f"{name}.png"
    res = _run_chromium(
        [
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            f"--window-size={WIDTH},{HEIGHT}",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        tmp,
    )
    assert shot.is_file(), f"no screenshot (chromium exit {res.returncode}): {res.stderr[-2000:]}"
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console

    from matplotlib import image as mpimg

    pixels = np.asarray(mpimg.imread(shot))  # float in [0, 1], H x W x (3 or 4)
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    rgb = pixels[..., :3]
    non_white = np.mean(np.any(rgb < 0.95, axis=2))
    colourful = np.mean(rgb.max(axis=2) - rgb.min(axis=2) > 0.25)  # plot bars and lines
    # Thresholds, from measurement on the first 1200x2000 pixels: the evaluation
    # report 8.4% non-white / 2.3% coloured, the transform report 19.7% / 14.5%,
    # a page that draws nothing 0% / 0% (test_a_blank_page_fails_the_screenshot_check).
    # 2% and 0.2% sit well between.
    print(f"{name}: {non_white:.2%} non-white, {colourful:.2%} coloured pixels")
    assert non_white > 0.02, f"screenshot is almost blank ({non_white:.3%} non-white pixels)"
    assert colourful > 0.002, f"no plot colours in the screenshot ({colourful:.3%})"
    return probe


@pytest.fixture(scope="module")
def fm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert FMNIST.is_file(), f"{FMNIST} is missing"
    out = tmp_path_factory.mktemp("fmnist")
    subprocess.run(
        [
            sys.executable,
            str(REPO / "models" / "fashion_mnist" / "data.py"),
            "--out",
            str(out),
            "--num-calib",
            "48",
            "--num-eval",
            "48",
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_evaluation_report_renders(fm_data: Path, tmp_path: Path, nbsmt_library: str) -> None:
    config = EvaluateConfig(
        threads=(2,), transform=TransformConfig(num_samples=48, batch_size=16), layer_samples=16
    )
    result = evaluate(
        FMNIST,
        fm_data / "eval.npz",
        fm_data / "calib.npz",
        config,
        labels=fm_data / "eval_labels.npy",
    )
    page = render_html(result.to_dict())
    assert "Not available" not in page  # every section has data for this model
    probe = check_renders(page, tmp_path, "evaluation")
    # accuracy, per-layer statistics, per-layer SQNR, BN shift, fused-layer correction
    assert probe["images"] == 5


def test_transform_report_renders(fm_data: Path, tmp_path: Path, nbsmt_library: str) -> None:
    result = transform(
        FMNIST,
        fm_data / "calib.npz",
        TransformConfig(
            num_samples=48, batch_size=16, recalibration=RecalibrationConfig(enabled=True)
        ),
    )
    probe = check_renders(render_html(result.report), tmp_path, "transform")
    assert probe["images"] >= 2  # per-layer statistics and BN shift


def test_search_report_renders(tmp_path: Path, nbsmt_library: str) -> None:
    import onnx
    import transform_models as tm

    from nbsmt_onnx.search import SearchConfig, search

    onnx.save(tm.conv_relu_gemm(0), tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((64, 3, 8, 8)).astype(np.float32))
    result = search(
        tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "eval.npz",
        SearchConfig(max_drop=5.0, transform=TransformConfig(num_samples=32)),
    )  # fmt: skip
    page = render_html(result.report())
    assert "Not available" not in page
    probe = check_renders(page, tmp_path, "search")
    assert probe["images"] == 2 and probe["tables"] == 3  # Pareto front, sensitivities


def test_the_probe_catches_errors(tmp_path: Path) -> None:
    """The checks can fail: a script error and a broken image are reported."""
    page = (
        "<!DOCTYPE html><html><head><title>t</title></head><body><table><tr><td>x</td></tr>"
        '</table><img src="data:image/png;base64,AAAA"><script>notDefined()</script></body></html>'
    )
    with pytest.raises(AssertionError, match="notDefined"):
        check_renders(page, tmp_path, "broken")


def test_a_blank_page_fails_the_screenshot_check(tmp_path: Path) -> None:
    """A page that loads cleanly but draws nothing visible is caught by the pixel check."""
    import base64
    import io

    from matplotlib import image as mpimg

    buf = io.BytesIO()
    mpimg.imsave(buf, np.ones((2, 2, 3)), format="png")  # a white image
    data = base64.b64encode(buf.getvalue()).decode()
    page = (
        "<!DOCTYPE html><html><head><title>t</title></head><body><table></table>"
        f'<img src="data:image/png;base64,{data}"></body></html>'
    )
    with pytest.raises(AssertionError, match="almost blank"):
        check_renders(page, tmp_path, "blank")
