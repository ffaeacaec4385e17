"""``python -m mixreorg.recipes.demo`` end to end: the server in a subprocess, the page in a real
headless Chromium (Debian's, driven by Playwright), and the JSON / multipart API without a browser.

The model is a tiny untrained GroupViT saved as Hugging Face weights, or ``MIXREORG_DEMO_MODEL``
(a run folder or checkpoint). ``MIXREORG_WRITE_DEMO_SCREENSHOT=1`` writes ``docs/demo.png``::

    MIXREORG_DEMO_MODEL=/tmp/demo_run MIXREORG_WRITE_DEMO_SCREENSHOT=1 python -m pytest tests/test_demo_browser.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mixreorg.data.synthshapes import SynthShapesEval
from tests.test_segment_cli import _save_hf, _tiny_groupvit

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
CLASSES = "circle, square, sky, grass"


def _start_server(model: str, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixreorg.recipes.demo", "--model", model, "--port", "0", "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the URL line, printed once the model is loaded and the port bound
    m = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not m:
        proc.kill()
        proc.wait()
        pytest.fail(f"the demo did not print its URL: {line!r}\n{log.read_text()}")
    return proc, m.group(0)


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("demo")
    model = os.environ.get("MIXREORG_DEMO_MODEL")
    if not model:
        _save_hf(_tiny_groupvit().eval(), tmp / "model.safetensors")
        model = str(tmp / "model.safetensors")
    proc, url = _start_server(model, tmp / "server.log")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log = (tmp / "server.log").read_text()
        assert "Traceback" not in log, log  # no request crashed the server


@pytest.fixture
def synth_png(tmp_path: Path) -> Path:
    path = tmp_path / "synthshapes.png"
    Image.fromarray(SynthShapesEval(8).raw(6)["image"]).save(path)
    return path


def _browser(tmp_path: Path) -> Any:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup_browser.sh` (installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (the browser itself: scripts/setup_browser.sh)")
    return sync_playwright(), dict(
        user_data_dir=str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
        args=CHROMIUM_ARGS, viewport={"width": 880, "height": 560},
    )  # fmt: skip


def test_demo_page_in_a_real_browser(demo_url: str, synth_png: Path, tmp_path: Path) -> None:
    pw, launch = _browser(tmp_path)
    with pw as p:
        context = p.chromium.launch_persistent_context(**launch)
        try:
            page = context.new_page()
            page.set_default_timeout(20_000)
            page.goto(demo_url)
            page.set_input_files("#image", str(synth_png))
            page.fill("#classes", CLASSES)
            with page.expect_response(lambda r: r.url.endswith("/segment")) as info:
                page.click("#run")
            answer = info.value.json()
            assert info.value.status == 200, answer
            page.wait_for_function(
                "() => { const i = document.getElementById('overlay'); return i.complete && i.naturalWidth > 0 }"
            )
            natural = page.eval_on_selector("#overlay", "i => [i.naturalWidth, i.naturalHeight]")
            png = Image.open(io.BytesIO(base64.b64decode(answer["overlay"])))
            assert natural == [answer["width"], answer["height"]] == [png.width, png.height]
            items = page.eval_on_selector_all(
                "#legend li", "ls => ls.map(l => [l.dataset.name, l.querySelector('.share').textContent])"
            )
            typed = [c.strip() for c in CLASSES.split(",")]
            assert items and {name for name, _ in items} <= set(typed)
            assert [name for name, _ in items] == [s["name"] for s in answer["shares"]]
            shown = [float(pct.rstrip("%")) for _, pct in items]
            assert sum(shown) == pytest.approx(100.0, abs=0.1 * len(shown))  # rounded to 0.1% each
            assert shown == sorted(shown, reverse=True)
            assert "classes found" in page.inner_text("#message")
            if os.environ.get("MIXREORG_WRITE_DEMO_SCREENSHOT") == "1":
                (ROOT / "docs").mkdir(exist_ok=True)
                page.screenshot(path=str(ROOT / "docs" / "demo.png"), full_page=True)
            # duplicated class names: the server's message is shown on the page, the result hidden
            page.fill("#classes", "circle, sky, Circle")
            page.click("#run")
            page.wait_for_selector("#message.error")
            assert "duplicated class names" in page.inner_text("#message")
            assert page.is_hidden("#result")
            # an unreadable upload
            bad = tmp_path / "notes.png"
            bad.write_text("not an image")
            page.set_input_files("#image", str(bad))
            page.fill("#classes", CLASSES)
            page.click("#run")
            page.wait_for_function("() => document.getElementById('message').textContent.includes('cannot read')")
            assert "Traceback" not in page.content()
        finally:
            context.close()


def _post(url: str, body: bytes, ctype: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url + "segment", data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    b = "----mixreorgtestboundary"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")  # fmt: skip
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def test_demo_api_multipart_json_and_bad_input(demo_url: str, synth_png: Path) -> None:
    png = synth_png.read_bytes()
    status, ans = _post(demo_url, *_multipart({"classes": "grass, sky, circle", "bg_thresh": "0.5"}, png))
    assert status == 200, ans
    assert ans["classes"] == ["background", "grass", "sky", "circle"] and ans["bg_thresh"] == 0.5
    assert sum(s["share"] for s in ans["shares"]) == pytest.approx(1.0)
    assert all(re.fullmatch(r"#[0-9a-f]{6}", s["colour"]) for s in ans["shares"])
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    status, ans = _post(demo_url, json.dumps({"image": data_url, "classes": "star"}).encode(), "application/json")
    assert status == 200 and [s["name"] for s in ans["shares"]] == ["star"]  # one class owns every pixel
    bad = {
        "no class names": {"image": data_url, "classes": " "},
        "empty name": {"image": data_url, "classes": "cat,,dog"},
        "duplicated": {"image": data_url, "classes": "cat, Cat"},
        "no image": {"image": None, "classes": "cat"},
        "cannot read": {"image": base64.b64encode(b"junk").decode(), "classes": "cat"},
        "not valid base64": {"image": "@@@", "classes": "cat"},
        "in [0, 1]": {"image": data_url, "classes": "cat", "bg_thresh": 2},
        "leave it out": {"image": data_url, "classes": "cat, background", "bg_thresh": 0.9},
    }
    for message, body in bad.items():
        status, ans = _post(demo_url, json.dumps(body).encode(), "application/json")
        assert status == 400 and message in ans["error"] and "Traceback" not in ans["error"], (message, ans)
    assert _post(demo_url, b"{not json", "application/json")[0] == 400
    assert _post(demo_url, b"x", "text/plain")[0] == 415
    with urllib.request.urlopen(demo_url, timeout=10) as resp:
        assert resp.status == 200 and b'id="classes"' in resp.read()
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(demo_url + "nope", timeout=10)
    # the server stays up after all of that
    assert _post(demo_url, *_multipart({"classes": "sky"}, png))[0] == 200
