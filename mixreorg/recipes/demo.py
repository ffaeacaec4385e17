"""Try a vocabulary in the browser: upload an image, type class names, see the segmentation.

    python -m mixreorg.recipes.demo --model runs/tiny                 # http://127.0.0.1:7860/
    python -m mixreorg.recipes.demo --model groupvit/model.safetensors --port 0   # any free port

``--model`` takes what :mod:`mixreorg.recipes.segment` takes (a run folder or checkpoint of
:mod:`mixreorg.recipes.pretrain`, or imported GroupViT weights); it is loaded once, at start. The
server is the standard library's ``ThreadingHTTPServer`` and the page is plain HTML + JavaScript
(no extra dependency). Endpoints:

* ``GET /``: the page. A person picks an image, types comma-separated class names (optionally a
  background threshold in [0, 1]) and presses *Segment*; the page shows the image | overlay with
  its legend (what :func:`mixreorg.recipes.segment.segment_files` draws) and the share of pixels of
  every class found, largest first.
* ``POST /segment``: ``multipart/form-data`` (fields ``image`` (a file), ``classes``, optional
  ``bg_thresh``) or JSON ``{"image": base64 or data URL, "classes": "...", "bg_thresh": 0.9}``.
  Answers JSON ``{"overlay": base64 PNG, "width", "height", "classes", "shares": [{"name",
  "share", "colour"}, ...]}``; bad input (no/unreadable image, empty or duplicated class names, a
  threshold outside [0, 1]) answers HTTP 400 ``{"error": message}``, never a stack trace.

``--port 0`` picks a free port; the URL served is printed either way.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

from mixreorg.recipes.loading import load_inference_model  # noqa: E402
from mixreorg.recipes.segment import parse_classes, segment_files  # noqa: E402

__all__ = ["Demo", "DemoError", "PAGE", "decode_image", "parse_bg_thresh", "parse_request", "make_server", "main"]

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000


class DemoError(ValueError):
    """Bad input from the page: answered with HTTP ``status`` and this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes | None) -> Any:
    """The uploaded bytes as an RGB PIL image (DemoError when missing or unreadable)."""
    from PIL import Image

    if not data:
        raise DemoError("no image: choose an image file to upload")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DemoError(f"image too large: {img.width}x{img.height} pixels (at most {MAX_IMAGE_PIXELS})")
            return img.convert("RGB")
    except DemoError:
        raise
    except Exception as err:  # PIL raises several types for unreadable data
        raise DemoError(f"cannot read the uploaded file as an image ({type(err).__name__}: {err})") from err


def parse_bg_thresh(value: Any) -> float | None:
    """``""`` / None -> no background class; otherwise a float in [0, 1]."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"background threshold must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= t <= 1.0:  # also rejects NaN
        raise DemoError(f"background threshold must be in [0, 1], got {t}")
    return t


def _class_list(text: Any) -> list[str]:
    """:func:`~mixreorg.recipes.segment.parse_classes`, its messages worded for the page."""
    if not isinstance(text, str) or not text.strip():
        raise DemoError("no class names: type comma-separated class names, e.g. 'cat, dog, sofa'")
    try:
        return parse_classes(text)
    except ValueError as err:
        raise DemoError(str(err).replace("--classes ", "the class list ")) from None


@dataclass
class Demo:
    """A loaded model and how images are fed to it; :meth:`run` answers one request."""

    model: nn.Module
    short_side: int
    device: str = "cpu"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: str | Path, short_side: int | None = None, device: str = "cpu") -> Demo:
        model, size = load_inference_model(path)
        short = short_side or size or 448
        if short < 1:
            raise ValueError(f"--short-side must be >= 1, got {short}")
        return cls(model.to(device).eval(), int(short), device)

    def run(self, image: bytes | None, classes: Any, bg_thresh: Any = None) -> dict[str, Any]:
        """Segment ``image`` (encoded bytes) with ``classes`` (comma-separated): the JSON answer."""
        from mixreorg.viz import palette

        names = _class_list(classes)
        thresh = parse_bg_thresh(bg_thresh)
        if thresh is not None and any(n.strip().lower() == "background" for n in names):
            raise DemoError("'background' is added by the background threshold: leave it out of the class list")
        img = decode_image(image)
        shown = (["background"] + names) if thresh is not None else names
        if len(shown) > 255:
            raise DemoError(f"at most 255 classes, got {len(shown)}")
        with tempfile.TemporaryDirectory(prefix="mixreorg_demo_") as tmp, self.lock:
            src = Path(tmp) / "upload.png"
            img.save(src)
            res = segment_files(self.model, [src], names, Path(tmp) / "out", short_side=self.short_side,
                                bg_thresh=thresh, device=self.device)[0]  # fmt: skip
            png = Path(res["overlay"]).read_bytes()
            width, height = _png_size(png)
        colours = palette(len(shown))
        shares = [
            {"name": k, "share": v, "colour": "#" + "".join(f"{int(c):02x}" for c in colours[shown.index(k)])}
            for k, v in res["shares"].items()
        ]
        return {"overlay": base64.b64encode(png).decode("ascii"), "width": width, "height": height,
                "classes": shown, "bg_thresh": thresh, "shares": shares}  # fmt: skip


def _png_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.width, im.height


def _b64_image(value: Any) -> bytes | None:
    """A JSON ``image``: base64, optionally as a ``data:...;base64,`` URL."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise DemoError("'image' must be a base64 string (or a data URL)")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DemoError("'image' is not valid base64") from None


def _multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """The fields of a ``multipart/form-data`` body: file contents as bytes, the rest as str."""
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not msg.is_multipart():
        raise DemoError("malformed multipart/form-data body")
    fields: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        is_file = part.get_filename() is not None or name == "image"
        fields[str(name)] = data if is_file else data.decode(part.get_content_charset() or "utf-8", "replace")
    return fields


def parse_request(content_type: str, body: bytes) -> tuple[bytes | None, Any, Any]:
    """``(image bytes, classes, bg_thresh)`` of a POST /segment body (JSON or multipart)."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DemoError(f"the request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise DemoError("the JSON body must be an object with 'image', 'classes' and optional 'bg_thresh'")
        return _b64_image(data.get("image")), data.get("classes"), data.get("bg_thresh")
    if ctype == "multipart/form-data":
        fields = _multipart(content_type, body)
        return fields.get("image"), fields.get("classes"), fields.get("bg_thresh")
    raise DemoError(f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data or JSON", 415)


class _Handler(BaseHTTPRequestHandler):
    server: _DemoServer
    server_version = "mixreorg-demo"

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?")[0] in ("/", "/index.html"):
            self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        else:
            self._json(404, {"error": f"not found: {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/segment":
            self._json(404, {"error": f"not found: {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD_BYTES:
                self.close_connection = True
                raise DemoError(f"upload too large: {length} bytes (at most {MAX_UPLOAD_BYTES})", 413)
            body = self.rfile.read(length) if length > 0 else b""
            answer = self.server.demo.run(*parse_request(self.headers.get("Content-Type", ""), body))
        except DemoError as err:
            self._json(err.status, {"error": str(err)})
        except ValueError as err:  # the library's own input checks (segment, zeroshot)
            self._json(400, {"error": str(err)})
        except Exception as err:  # logged here; the page gets a message, not the trace
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": f"internal error ({type(err).__name__}); see the server's log"})
        else:
            self._json(200, answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        if not self.server.quiet:
            super().log_message(format, *args)


class _DemoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], demo: Demo, quiet: bool = False) -> None:
        self.demo, self.quiet = demo, quiet
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"


def make_server(demo: Demo, host: str = "127.0.0.1", port: int = 7860, quiet: bool = False) -> _DemoServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (see ``.url``)."""
    return _DemoServer((host, port), demo, quiet)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixreorg.recipes.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="run folder, checkpoint, or HF / NVlabs GroupViT weights")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    ap.add_argument("--short-side", type=int, help="resize short side to this (default: the model's training size)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = ap.parse_args(argv)
    try:
        demo = Demo.load(args.model, args.short_side, args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        server = make_server(demo, args.host, args.port, args.quiet)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    print(f"mixreorg demo: serving {args.model} on {server.url}  (Ctrl+C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mixreorg: zero-shot segmentation demo</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; max-width: 72rem; color: #222; }
  form { display: grid; grid-template-columns: max-content 1fr; gap: .5rem 1rem; align-items: center;
         max-width: 44rem; }
  input[type=text] { width: 100%; }
  button { grid-column: 2; justify-self: start; padding: .35rem 1.2rem; }
  #message { margin: 1rem 0; min-height: 1.4em; }
  #message.error { color: #b00020; font-weight: 600; }
  #result { display: flex; gap: 1.5rem; align-items: flex-start; flex-wrap: wrap; }
  #result[hidden] { display: none; }
  #overlay { image-rendering: pixelated; border: 1px solid #ccc; max-width: 100%; }
  #legend { list-style: none; padding: 0; margin: 0; }
  #legend li { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
  .swatch { width: 1rem; height: 1rem; border: 1px solid #555; display: inline-block; }
  .share { font-variant-numeric: tabular-nums; margin-left: auto; padding-left: 1rem; }
</style>
</head>
<body>
<h1>Zero-shot segmentation with any vocabulary</h1>
<form id="form">
  <label for="image">Image</label><input id="image" name="image" type="file" accept="image/*">
  <label for="classes">Class names</label>
  <input id="classes" name="classes" type="text" placeholder="comma-separated, e.g. cat, dog, sofa">
  <label for="bg-thresh">Background threshold</label>
  <input id="bg-thresh" name="bg_thresh" type="text" placeholder="optional, in [0, 1], e.g. 0.9">
  <button id="run" type="submit">Segment</button>
</form>
<div id="message" role="alert"></div>
<div id="result" hidden>
  <img id="overlay" alt="image | overlay with legend">
  <div><h2>Classes found</h2><ul id="legend"></ul></div>
</div>
<script>
const $ = (id) => document.getElementById(id);
function say(text, isError) { $("message").textContent = text; $("message").className = isError ? "error" : ""; }
function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error("cannot read the chosen file"));
    r.readAsDataURL(file);
  });
}
function show(answer) {
  const legend = $("legend");
  legend.replaceChildren();
  for (const s of answer.shares) {
    const li = document.createElement("li");
    li.dataset.name = s.name; li.dataset.share = String(s.share);
    const sw = document.createElement("span"); sw.className = "swatch"; sw.style.background = s.colour;
    const name = document.createElement("span"); name.className = "name"; name.textContent = s.name;
    const pct = document.createElement("span"); pct.className = "share";
    pct.textContent = (100 * s.share).toFixed(1) + "%";
    li.append(sw, name, pct); legend.append(li);
  }
  const img = $("overlay");
  img.dataset.width = answer.width; img.dataset.height = answer.height;
  img.src = "data:image/png;base64," + answer.overlay;
  $("result").hidden = false;
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("image").files[0];
  const button = $("run");
  button.disabled = true; say("Segmenting\u2026", false);
  try {
    const body = {classes: $("classes").value, bg_thresh: $("bg-thresh").value,
                  image: file ? await readFile(file) : null};
    const resp = await fetch("/segment", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)});
    let answer;
    try { answer = await resp.json(); } catch (e) { answer = {error: "HTTP " + resp.status}; }
    if (!resp.ok || answer.error) { $("result").hidden = true; say(answer.error || ("HTTP " + resp.status), true); }
    else { show(answer); say("Done: " + answer.shares.length + " of " + answer.classes.length + " classes found.",
                             false); }
  } catch (e) {
    $("result").hidden = true; say(String(e.message || e), true);
  } finally {
    button.disabled = false;
  }
});
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
