#!/usr/bin/env python
"""The prepared GPU run: correctness, bandwidth and training-step numbers in one process.

    python benchmarks/gpu_suite.py --out DIR                 # one GPU, about 5-8 minutes
    python benchmarks/gpu_suite.py --out DIR --smoke         # tiny shapes and iterations (the CPU test)
    python benchmarks/gpu_suite.py --out DIR --only bitexact,mix_bench --budget-s 200

Writes ``DIR/gpu_suite.json`` (everything) and ``DIR/gpu_suite.md`` (the tables, headed by the
device and the torch, Triton and CUDA versions) after every section, so a run cut short still
leaves its report, and prints the Markdown at the end. Exit status 1 when a section failed.

Sections (the names ``--only`` takes); each yields rows with status ok / fail / skipped and a reason:

* ``cuda_tests``: ``pytest -m cuda tests`` in a subprocess (CUDA only).
* ``bitexact``: every Triton op against the torch path bit for bit (``mix``, ``restore``, ``mix_add``,
  ``patch_gather``, ``patch_gather_add``; forward, and backward of the first three), in fp32, fp16,
  bf16 and fp64, on odd and strided shapes, with NaN (payload bits set), +-inf, -0 and subnormal
  values; ``gumbel_assign`` against its reference to float rounding (it is not bit-exact by design,
  see mixreorg/ops/assign.py). Without CUDA: tiny shapes under ``TRITON_INTERPRET=1``.
* ``mix_bench``: mix / restore / mix_add forward, backward, forward+backward at the paper's shape
  [256, 196, 384] and at >= 256 MB, fp32 and bf16: median time, GB/s of the bytes the op must read
  plus write (N = one tensor: mix fwd 2N, bwd 2N, fwd+bwd 4N; mix_add fwd 3N, fwd+bwd 5N), the
  ratio of that to ``clone``'s GB/s on the same tensor in the same run, and the speed-up over the
  advanced-indexing autograd users write today (``x[src, arange(L)]``). Triton is timed on CUDA only.
* ``assign_bench``: fused ``gumbel_assign`` vs its torch reference vs ``F.gumbel_softmax(hard=True)``
  (then GroupViT's normalisation) at GroupViT-S's logits [256, 64, 196] and [256, 8, 64]:
  forward+backward time and the bytes autograd saves for backward.
* ``train_step``: one optimiser step of GroupViT-S and MixReorg-S (224 px, batch 256, bf16
  autocast), activation checkpointing off and on: img/s, peak memory, MixReorg / GroupViT time.
  ``--smoke`` steps a tiny model instead, so that the code also runs on CPU.
* ``compile_mixer``: ``torch.compile(fullgraph=True)`` of ``MixedPatchMixer`` mix -> mix_add ->
  restore (CUDA only): bit-equal to eager, compile time, compiled vs eager time.
* ``torchrun``: ``torchrun --standalone --nproc_per_node 1 -m mixreorg.recipes.pretrain --steps 3``
  and a one-process nccl ``all_reduce`` (CUDA only).

Timing: CUDA events on GPU, ``time.perf_counter`` on CPU; the median of the iterations after a
warm-up. ``--budget-s`` (default 450) is a global time budget: once spent, what is left is
skipped with that reason (subprocess timeouts are capped by what is left).

For a GPU machine with its own python3 and no package registry: if ``import mixreorg`` fails the
script runs ``pip install --no-deps --no-build-isolation --no-index -e .`` and imports from the tree;
whatever needs a package that is not there (Triton, pytest, hypothesis) is skipped, saying so.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME, MD_NAME = "gpu_suite.json", "gpu_suite.md"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
DETAIL_KEYS = ("traceback", "output_tail")  # long text: in the JSON, and in code blocks under a table


def triton_timing_skip(ctx: Ctx) -> str:
    """Why Triton is not timed here ('' when it is)."""
    from mixreorg.ops import has_triton

    if not has_triton():
        return "needs triton (not installed or does not import)"
    return "" if ctx.cuda else "Triton timing needs CUDA (on CPU Triton runs only in its interpreter)"


def timing_skip(ctx: Ctx, impl: str) -> str:
    """Why a timing row of ``impl`` is not measured ('' when it is): no Triton timing, or no budget."""
    if impl == "triton" and triton_timing_skip(ctx):
        return triton_timing_skip(ctx)
    return ctx.budget_reason() if ctx.left() <= 0 else ""


# ---------------------------------------------------------------------------------------------
# set-up: mixreorg importable, Triton's interpreter where there is no GPU
# ---------------------------------------------------------------------------------------------
def bootstrap() -> str:
    """Make ``mixreorg`` importable and say how (installed, pip-installed, or from the tree)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit
    try:
        import mixreorg  # noqa: F401

        how = "installed"
    except ImportError:
        how = _pip_install_tree()
        if str(ROOT) not in sys.path:  # an editable install's .pth is only read at start-up
            sys.path.insert(0, str(ROOT))
    import mixreorg
    from mixreorg._compat import make_torchvision_importable

    make_torchvision_importable()
    return f"{how} ({Path(mixreorg.__file__).parent})"


def _pip_install_tree() -> str:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"from the tree (pip install -e failed: {err})"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"from the tree (pip install -e failed: {last[:120]})"
    return "pip install --no-deps -e . (this run imports from the tree)"


def subprocess_env() -> dict:
    """This environment with the tree first on PYTHONPATH (for ``-m mixreorg...`` and pytest)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"no CUDA: torch {torch.__version__} is a CPU build"
    return "no CUDA device visible (torch.cuda.is_available() is False)"


def environment(ctx: Ctx, how: str) -> dict:
    """The header of the report: device, versions, mode."""
    from mixreorg.ops import has_triton

    triton = _version("triton")
    if triton != "not installed" and not has_triton():
        triton += " (does not import)"
    info = dict(device="", torch=torch.__version__, triton=triton,
                cuda=torch.version.cuda or "none (CPU build of torch)", python=platform.python_version())
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        info["device"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm {p.major}.{p.minor})"
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as err:  # a build without NCCL
            info["nccl"] = f"unavailable ({_err(err)})"
    else:
        info["device"] = f"CPU, {torch.get_num_threads()} threads ({no_cuda_reason()})"
    for pkg in ("timm", "transformers", "pytest", "hypothesis"):
        info[pkg] = _version(pkg)
    info.update(mixreorg=how, mode="smoke" if ctx.smoke else "full", budget_s=ctx.budget_s,
                triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return info


# ---------------------------------------------------------------------------------------------
# context, rows, sections, timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    out: Path
    smoke: bool = False
    budget_s: float = 450.0
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    t0: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def budget_reason(self) -> str:
        return f"time budget spent ({self.elapsed():.0f} s of --budget-s {self.budget_s:.0f})"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    fn: Callable[[Ctx], Iterator[dict]]  # a generator of rows: rows before an exception are kept
    cuda_only: bool = False
    min_s: float = 0.0  # not started with less of the budget left (a section overruns what it starts)


def _r(v):
    return float(f"{v:.4g}") if isinstance(v, float) else v


def row(name: str, status: str = "ok", reason: str = "", **metrics) -> dict:
    return dict(name=name, status=status, **{k: _r(v) for k, v in metrics.items()}, reason=reason)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def first_error(text: str) -> tuple[str, str]:
    """The first ``SomeError: message`` line of a subprocess's output and an excerpt: its first
    traceback (a child's, under torchrun) and the output's last lines."""
    lines = text.strip().splitlines()
    error = next((ln.strip() for ln in lines if re.match(r"^\s*[\w.]*(Error|Exception)\b.*:", ln)), "")
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), None)
    if start is None:
        return error, _tail(text, 30)
    head = lines[start : start + 25]
    return error, "\n".join(head + ["..."] + lines[-10:]) if len(lines) > start + 35 else "\n".join(lines[start:])


def _err(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()[:300]


def guarded(name: str, fn: Callable[[], dict], **meta) -> dict:
    """A row from ``fn() -> metrics`` (a ``status``/``reason`` in them is kept); an exception
    makes it a failed row with the traceback's tail."""
    try:
        metrics = dict(fn())
    except Exception as err:
        return row(name, "fail", _err(err), **meta, traceback=_tail(traceback.format_exc()))
    status, reason = metrics.pop("status", "ok"), metrics.pop("reason", "")
    return row(name, status, reason, **meta, **metrics)


def summarise(rows: list[dict]) -> tuple[str, str]:
    """A section's status from its rows: fail if any failed, skipped if all were."""
    n = {s: sum(r["status"] == s for r in rows) for s in ("ok", "fail", "skipped")}
    if not rows:
        return "skipped", "no rows"
    if n["fail"]:
        return "fail", f"{n['fail']} of {len(rows)} rows failed"
    if n["ok"] == 0:
        return "skipped", rows[0]["reason"]
    return "ok", f"{n['skipped']} of {len(rows)} rows skipped" if n["skipped"] else ""


def run_section(section: Section, ctx: Ctx) -> dict:
    """Run one section; an exception in it fails it (with the traceback's tail), nothing more."""
    res = dict(section=section.name, title=section.title, status="skipped", reason="", seconds=0.0, rows=[])
    if section.cuda_only and not ctx.cuda:
        res["reason"] = f"not run: needs CUDA ({no_cuda_reason()})"
        return res
    if ctx.left() <= max(0.0, section.min_s):
        res["reason"] = ctx.budget_reason() if ctx.left() <= 0 else (
            f"needs about {section.min_s:.0f} s, {ctx.left():.0f} s of --budget-s {ctx.budget_s:.0f} left")
        return res
    t = time.perf_counter()
    try:
        for r in section.fn(ctx):
            res["rows"].append(r)
        res["status"], res["reason"] = summarise(res["rows"])
    except Exception as err:
        res.update(status="fail", reason=_err(err), traceback=_tail(traceback.format_exc()))
    finally:
        res["seconds"] = round(time.perf_counter() - t, 2)
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    return res


def run_sections(sections: list[Section], ctx: Ctx,
                 on_result: Callable[[list[dict]], None] | None = None) -> list[dict]:
    results: list[dict] = []
    for s in sections:
        res = run_section(s, ctx)
        results.append(res)
        print(f"[{ctx.elapsed():6.1f} s] {s.name}: {res['status']} ({res['seconds']:.1f} s) {res['reason']}",
              flush=True)
        if on_result is not None:
            on_result(results)
    return results


def time_ms(ctx: Ctx, fn: Callable[[], object], iters: int | None = None, warmup: int | None = None) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, ``perf_counter`` on CPU."""
    iters = iters or (2 if ctx.smoke else 20)
    warmup = (1 if ctx.smoke else 3) if warmup is None else warmup
    for _ in range(warmup):
        fn()
    if not ctx.cuda:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def run_command(ctx: Ctx, cmd: list[str], cap_s: float) -> tuple[int | None, str, float]:
    """``(exit status or None on timeout, stdout + stderr, seconds)``, the timeout capped by the budget."""
    timeout = max(10.0, min(cap_s, ctx.left()))
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return None, text + f"\n[timed out after {timeout:.0f} s]", time.perf_counter() - t
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# section: CUDA tests
# ---------------------------------------------------------------------------------------------
def section_cuda_tests(ctx: Ctx) -> Iterator[dict]:
    name = "pytest -m cuda tests"
    missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        yield row(name, "skipped", f"needs {', '.join(missing)} (not installed)")
        return
    # only the files with cuda-marked tests: a module that needs a missing package elsewhere must not
    # fail the collection
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    if not files:
        yield row(name, "skipped", f"no test file under {ROOT / 'tests'} has a pytest.mark.cuda test")
        return
    # addopts replaced: the project's has --benchmark-disable, an error without pytest-benchmark
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *files, "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    rc, out, secs = run_command(ctx, cmd, cap_s=240)
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", out.strip().splitlines()[-1] if out else ""):
        counts["errors" if what.startswith("error") else what] += int(n)
    meta = dict(**counts, seconds=secs, command=shlex.join(cmd[2:]))
    if rc == 0 and counts["passed"] == 0:
        yield row(name, "skipped", "every selected test skipped itself", **meta, output_tail=_tail(out, 30))
    elif rc == 0:
        yield row(name, "ok", **meta)
    elif rc == 5:
        yield row(name, "skipped", "no test carries the cuda marker", **meta)
    else:
        reason = "timed out" if rc is None else f"exit status {rc}"
        yield row(name, "fail", reason, **meta, output_tail=_tail(out, 30))


# ---------------------------------------------------------------------------------------------
# section: bit-exactness of the Triton ops against the torch path
# ---------------------------------------------------------------------------------------------
_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}
_NAN_BITS = {torch.float64: 0x7FF8_0000_0000_0123, torch.float32: 0x7FC0_0123, torch.float16: 0x7E01,
             torch.bfloat16: 0x7FC1}  # quiet NaNs with payload bits set


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    prefix: int
    grid: tuple[int, int]
    suffix: int
    C: int
    G: int
    layout: str = "contiguous"  # | "sliced" (rows wider than C) | "transposed" (L-major storage)
    specials: bool = True  # NaN with payload, -NaN, +-inf, -0, subnormal, +-max

    @property
    def L(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1] + self.suffix


def bitexact_cases(ctx: Ctx) -> list[Case]:
    tiny = [Case("odd", 4, 1, (2, 3), 2, 5, 2), Case("sliced", 6, 0, (3, 3), 1, 3, 3, "sliced"),
            Case("transposed", 4, 2, (1, 5), 0, 4, 4, "transposed", specials=False)]
    if ctx.smoke or not ctx.cuda:
        return tiny
    return tiny + [Case("odd-wide", 6, 1, (7, 5), 8, 1027, 3, "transposed"),
                   Case("paper", 256, 0, (14, 14), 0, 384, 16, specials=False),
                   Case("groupvit-s1", 32, 0, (14, 14), 64, 385, 16, "sliced")]


def _special_bits(dtype: torch.dtype) -> torch.Tensor:
    f = torch.finfo(dtype)
    vals = torch.tensor([float("inf"), float("-inf"), -0.0, f.smallest_normal / 4, f.max, -f.max], dtype=dtype)
    nan = _NAN_BITS[dtype]
    neg_nan = (nan | (1 << (f.bits - 1))) - (1 << f.bits)  # sign bit set, as a signed integer
    return torch.cat([vals.view(_INT_OF[dtype]), torch.tensor([nan, neg_nan], dtype=_INT_OF[dtype])])


def case_tokens(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """``[B, L, C]`` in ``case.layout``, with special values spread over it if ``case.specials``."""
    g = torch.Generator().manual_seed(seed)
    B, L, C = case.B, case.L, case.C
    storage = {"contiguous": (B, L, C), "sliced": (B, L, C + 3), "transposed": (B, C, L)}[case.layout]
    base = torch.randn(storage, generator=g).to(dtype)
    if case.specials:
        flat = base.view(-1).view(_INT_OF[dtype])
        special = _special_bits(dtype)
        idx = torch.arange(seed % 5, flat.numel(), 5)
        flat[idx] = special[torch.arange(idx.numel()) % special.numel()]
    base = base.to(device)
    if case.layout == "sliced":
        return base[..., :C]
    return base.transpose(1, 2) if case.layout == "transposed" else base


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_OF[t.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor, nan_payload_may_differ: bool = False) -> tuple[bool, str]:
    """Bit-for-bit equality; after an add, NaN payloads may be allowed to differ (NaN where NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, f"shape/dtype {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}"
    if torch.equal(_bits(a), _bits(b)):
        return True, "bitwise"
    na, nb = a.isnan(), b.isnan()
    if nan_payload_may_differ and torch.equal(na, nb) and torch.equal(_bits(a)[~na], _bits(b)[~nb]):
        return True, "bitwise except NaN payloads"
    return False, f"{int((_bits(a) != _bits(b)).sum())} of {a.numel()} elements differ"


def _patch_ops(case: Case, plan) -> dict:
    """op name -> (fn(x, y, impl) -> out, whether it reads y (and adds))."""
    from mixreorg.ops import mix, mix_add, patch_gather, patch_gather_add, restore

    kw = dict(num_prefix_tokens=case.prefix, num_suffix_tokens=case.suffix)
    rows, inv = plan.rows(case.L, case.prefix)
    return {
        "mix": (lambda x, y, impl: mix(x, plan, **kw, impl=impl), False),
        "restore": (lambda x, y, impl: restore(x, plan, **kw, impl=impl), False),
        "mix_add": (lambda x, y, impl: mix_add(y, x, plan, **kw, impl=impl), True),
        "patch_gather": (lambda x, y, impl: patch_gather(x, rows, inv, impl=impl), False),
        "patch_gather_add": (lambda x, y, impl: patch_gather_add(y, x, rows, inv, impl=impl), True),
    }


BACKWARD_OPS = ("mix", "restore", "mix_add")


def _check_patch_op(fn, adds: bool, direction: str, x, y, g) -> tuple[bool, str]:
    if direction == "fwd":
        return same_bits(fn(x, y, "triton"), fn(x, y, "torch"), nan_payload_may_differ=adds)
    grads = {}
    for impl in ("triton", "torch"):
        xs = x.detach().requires_grad_()
        ys = y.detach().requires_grad_()
        inputs = (xs, ys) if adds else (xs,)
        grads[impl] = torch.autograd.grad(fn(xs, ys, impl), inputs, g)
    checks = [same_bits(a, b) for a, b in zip(grads["triton"], grads["torch"])]
    bad = [why for ok, why in checks if not ok]
    return (False, "; ".join(bad)) if bad else (True, "bitwise")


def section_bitexact(ctx: Ctx) -> Iterator[dict]:
    from mixreorg.ops import MixPlan, has_triton, triton_interpret

    if not has_triton():
        yield row("Triton ops vs torch", "skipped", "triton is not importable")
        return
    if not ctx.cuda and not triton_interpret():
        yield row("Triton ops vs torch", "skipped", "needs CUDA, or TRITON_INTERPRET=1 on CPU")
        return
    cases = bitexact_cases(ctx)
    results: dict[tuple[str, str], list[tuple[str, bool, str]]] = {}
    done = 0
    for ci, case in enumerate(cases):
        if ctx.left() <= 0:
            break
        done += 1
        plan = MixPlan.create(case.B, case.grid[0] * case.grid[1], case.G, grid=case.grid, seed=ci, device=ctx.device)
        for dname, dtype in DTYPES.items():
            x, y, g = (case_tokens(case, dtype, ctx.device, 3 * ci + k) for k in range(3))
            for op, (fn, adds) in _patch_ops(case, plan).items():
                for direction in ("fwd", "bwd") if op in BACKWARD_OPS else ("fwd",):
                    try:
                        ok, how = _check_patch_op(fn, adds, direction, x, y, g)
                    except Exception as err:
                        ok, how = False, _err(err)
                    results.setdefault((op, direction), []).append((f"{case.name}/{dname}", ok, how))
    for (op, direction), checks in results.items():
        bad = [f"{where}: {how}" for where, ok, how in checks if not ok]
        hows = sorted({how for _, ok, how in checks if ok})
        yield row(f"{op} {direction}", "fail" if bad else "ok", "; ".join(bad)[:400], checks=len(checks),
                  cases=len({w.split('/')[0] for w, _, _ in checks}), dtypes="fp32 fp16 bf16 fp64",
                  compare=" / ".join(hows) or "-")
    if done < len(cases):
        yield row(f"cases {', '.join(c.name for c in cases[done:])}", "skipped", ctx.budget_reason())
    yield from _assign_exactness(ctx)


_ASSIGN_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=1e-2),
               torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}  # as tests/test_assign.py


def _assign_pair(x: torch.Tensor, noise: torch.Tensor, ga: torch.Tensor, gs: torch.Tensor) -> dict:
    from mixreorg.ops import gumbel_assign, gumbel_assign_reference

    out = {}
    for impl, fn in (("triton", lambda t: gumbel_assign(t, noise=noise, impl="triton")),
                     ("torch", lambda t: gumbel_assign_reference(t, noise=noise))):
        xs = x.detach().requires_grad_()
        attn, soft = fn(xs)
        (dx,) = torch.autograd.grad((attn, soft), xs, (ga, gs))
        out[impl] = dict(attn=attn, soft=soft, grad=dx)
    return out


def _assign_exactness(ctx: Ctx) -> Iterator[dict]:
    """``gumbel_assign`` Triton vs reference with the same noise: same arg-max, values to rounding."""
    from mixreorg.ops import sample_gumbel

    shapes = [("odd", (2, 5, 7), False), ("inf", (2, 3, 9), True)]
    if ctx.cuda and not ctx.smoke:
        shapes += [("s1", (8, 64, 196), False), ("s2", (8, 8, 64), True), ("wide", (3, 7, 1001), True)]
    for dname, dtype in DTYPES.items():
        name = f"gumbel_assign fwd+bwd {dname}"
        if dtype == torch.float64:
            yield row(name, "skipped", "the Triton kernel takes fp16/bf16/fp32 (fp64 runs the torch path)")
            continue
        if ctx.left() <= 0:
            yield row(name, "skipped", ctx.budget_reason())
            continue
        yield guarded(name, lambda dtype=dtype: _assign_checks(ctx, dtype, shapes, sample_gumbel),
                      dtypes=dname, compare="same arg-max; values to tests/test_assign.py's tolerance")


def _assign_checks(ctx: Ctx, dtype: torch.dtype, shapes, sample_gumbel) -> dict:
    bad, worst = [], 0.0
    for si, (label, shape, with_inf) in enumerate(shapes):
        g = torch.Generator().manual_seed(si)
        x = (torch.randn(shape, generator=g) * 2).to(dtype)
        if with_inf:  # +inf entries, and a token whose every logit is -inf (uniform by the clamp)
            x[0, 0, 1], x[-1, -1, 2] = float("inf"), float("-inf")
            x[0, :, 0] = float("-inf")
        x = x.to(ctx.device)
        noise = sample_gumbel(shape, 100 + si, device=ctx.device)
        ga, gs = (torch.randn(shape, generator=g).to(dtype).to(ctx.device) for _ in range(2))
        res = _assign_pair(x, noise, ga, gs)
        t, r = res["triton"], res["torch"]
        if not torch.equal(t["attn"] != 0, r["attn"] != 0):
            bad.append(f"{label}: arg-max differs")
        for key in ("attn", "soft", "grad"):
            a, b = t[key].detach().float(), r[key].detach().float()
            worst = max(worst, float((a - b).abs().nan_to_num(0.0).max()))
            try:
                torch.testing.assert_close(t[key], r[key], **_ASSIGN_TOL[dtype], equal_nan=True)
            except AssertionError as err:
                bad.append(f"{label} {key}: {str(err).splitlines()[0]}")
    return dict(status="fail" if bad else "ok", reason="; ".join(bad), checks=3 * len(shapes), cases=len(shapes),
                max_abs_diff=worst)


# ---------------------------------------------------------------------------------------------
# section: mix / restore / mix_add bandwidth
# ---------------------------------------------------------------------------------------------
def bench_configs(ctx: Ctx) -> list[tuple[str, str, tuple[int, int, int]]]:
    if ctx.smoke:
        return [("tiny", "fp32", (32, 16, 64)), ("tiny", "bf16", (32, 16, 64))]
    return [("paper", "fp32", (256, 196, 384)), ("paper", "bf16", (256, 196, 384)),
            ("large", "fp32", (1024, 196, 384)), ("large", "bf16", (2048, 196, 384))]  # 308 MB each


def _runner(direction: str, f: Callable[[], torch.Tensor], inputs: tuple, g: torch.Tensor) -> Callable[[], object]:
    """What is timed: the forward (no autograd graph), forward+backward, or the backward alone
    (one forward, then the backward again and again on its retained graph)."""
    if direction == "fwd":
        def fwd():
            with torch.no_grad():
                return f()
        return fwd
    if direction == "fwd+bwd":
        return lambda: torch.autograd.grad(f(), inputs, g)
    out = f()
    return lambda: torch.autograd.grad(out, inputs, g, retain_graph=True)


def _bench_cases(x, y, g, plan) -> list[tuple[str, str, str, Callable, tuple, int]]:
    """``(op, direction, impl, forward fn, differentiated inputs, bytes moved)``; advidx first
    in each (op, direction) so the others can be compared to it."""
    from mixreorg.ops import mix, mix_add, restore

    N = x.nbytes
    xr, yr = x.detach().requires_grad_(), y.detach().requires_grad_()
    ar = torch.arange(x.shape[1], device=x.device)
    cases = []
    for direction, nbytes in (("fwd", 2 * N), ("bwd", 2 * N), ("fwd+bwd", 4 * N)):
        cases.append(("mix", direction, "advidx", lambda: xr[plan.src, ar], (xr,), nbytes))
        for impl in ("torch", "triton"):
            cases.append(("mix", direction, impl, lambda impl=impl: mix(xr, plan, impl=impl), (xr,), nbytes))
    for direction, nbytes in (("fwd", 2 * N), ("fwd+bwd", 4 * N)):
        for impl in ("torch", "triton"):
            cases.append(("restore", direction, impl, lambda impl=impl: restore(xr, plan, impl=impl), (xr,), nbytes))
    for direction, nbytes in (("fwd", 3 * N), ("fwd+bwd", 5 * N)):
        cases.append(("mix_add", direction, "unfused", lambda: yr + mix(xr, plan), (yr, xr), nbytes))
        for impl in ("torch", "triton"):
            cases.append(("mix_add", direction, impl, lambda impl=impl: mix_add(yr, xr, plan, impl=impl),
                          (yr, xr), nbytes))
    return cases


def _bench_one(ctx: Ctx, label: str, dname: str, shape: tuple[int, int, int]) -> Iterator[dict]:
    from mixreorg.ops import MixPlan

    dtype = DTYPES[dname]
    plan = MixPlan.create(shape[0], shape[1], 16, seed=0, device=ctx.device)
    x = torch.randn(shape, device=ctx.device, dtype=dtype)
    y, g = torch.randn_like(x), torch.randn_like(x)
    meta = dict(shape=str(list(shape)), dtype=dname, MB=round(x.nbytes / 1e6))
    clone_ms = time_ms(ctx, x.clone)
    clone_gbps = 2 * x.nbytes / clone_ms / 1e6
    yield row(f"clone {label} {dname}", op="clone", dir="fwd", impl="clone", **meta, ms=clone_ms,
              GBps=clone_gbps, x_clone=1.0)
    advidx_ms: dict[tuple[str, str], float] = {}
    for op, direction, impl, f, inputs, nbytes in _bench_cases(x, y, g, plan):
        name = f"{op} {direction} {label} {dname} {impl}"
        tags = dict(op=op, dir=direction, impl=impl, **meta)
        if timing_skip(ctx, impl):
            yield row(name, "skipped", timing_skip(ctx, impl), **tags)
            continue

        def measure(f=f, inputs=inputs, nbytes=nbytes, direction=direction):
            ms = time_ms(ctx, _runner(direction, f, inputs, g))
            gbps = nbytes / ms / 1e6
            return dict(ms=ms, GBps=gbps, x_clone=gbps / clone_gbps)

        r = guarded(name, measure, **tags)
        if r["status"] == "ok":
            if impl == "advidx":
                advidx_ms[(op, direction)] = r["ms"]
            elif (op, direction) in advidx_ms:
                r["vs_advidx"] = _r(advidx_ms[(op, direction)] / r["ms"])
        yield r


def section_mix_bench(ctx: Ctx) -> Iterator[dict]:
    for label, dname, shape in bench_configs(ctx):
        if ctx.left() <= 0:
            yield row(f"{label} {dname}", "skipped", ctx.budget_reason())
            continue
        yield from _bench_one(ctx, label, dname, shape)
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# section: Gumbel assignment, fused vs F.gumbel_softmax(hard=True)
# ---------------------------------------------------------------------------------------------
def _gumbel_softmax_path(x: torch.Tensor, eps: float = 1.0):
    """What GroupViT code does today (NVlabs, Hugging Face): hard Gumbel-softmax over the groups,
    the token normalisation, and the plain softmax for the maps."""
    import torch.nn.functional as F

    a = F.gumbel_softmax(x, tau=1.0, hard=True, dim=-2)
    return a / (a.sum(dim=-1, keepdim=True) + eps), x.softmax(dim=-2)


def _assign_measure(ctx: Ctx, f: Callable, x: torch.Tensor, ga: torch.Tensor) -> dict:
    step = lambda: torch.autograd.grad(f(x)[0], x, ga)
    ms = time_ms(ctx, step)
    from _steps import saved_bytes  # after mixreorg is importable (_steps imports it)

    out = dict(ms=ms, saved_MiB=saved_bytes(f, x) / 2**20)
    if ctx.cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def section_assign_bench(ctx: Ctx) -> Iterator[dict]:
    from mixreorg.ops import gumbel_assign

    shapes = [("s1", (8, 8, 16)), ("s2", (8, 4, 8))] if ctx.smoke else [("s1", (256, 64, 196)), ("s2", (256, 8, 64))]
    impls = {"gumbel_softmax": _gumbel_softmax_path, "torch": lambda t: gumbel_assign(t, impl="torch"),
             "triton": lambda t: gumbel_assign(t, impl="triton")}
    for label, shape in shapes:
        for dname in ("fp32", "bf16"):
            g = torch.Generator(device=ctx.device).manual_seed(0)
            x = (torch.randn(shape, generator=g, device=ctx.device) * 2).to(DTYPES[dname]).requires_grad_()
            ga = torch.randn(shape, generator=g, device=ctx.device).to(DTYPES[dname])
            base: dict = {}
            for impl, f in impls.items():
                name = f"{label} {list(shape)} {dname} {impl}"
                tags = dict(shape=str(list(shape)), dtype=dname, impl=impl)
                if timing_skip(ctx, impl):
                    yield row(name, "skipped", timing_skip(ctx, impl), **tags)
                    continue
                r = guarded(name, lambda f=f, x=x, ga=ga: _assign_measure(ctx, f, x, ga), **tags)
                if r["status"] == "ok" and impl == "gumbel_softmax":
                    base = r
                elif r["status"] == "ok" and base:
                    r["speedup_vs_gumbel_softmax"] = _r(base["ms"] / r["ms"])
                    r["saved_vs_gumbel_softmax"] = _r(r["saved_MiB"] / base["saved_MiB"])
                yield r


# ---------------------------------------------------------------------------------------------
# section: one training step, GroupViT-S vs MixReorg-S
# ---------------------------------------------------------------------------------------------
def train_config(ctx: Ctx) -> dict:
    """GroupViT-S (``GroupViT()``'s defaults) at batch 256, 224 px; a tiny model under --smoke."""
    if not ctx.smoke:
        return dict(kwargs={}, batch=256, group_size=16, img=224, context=77)
    vision = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=2, depths=(1, 1, 1),
                  num_group_tokens=(8, 4, 0), num_output_groups=(8, 4), drop_path_rate=0.0)
    text = dict(context_length=16, width=64, layers=1, heads=2)
    return dict(kwargs=dict(vision=vision, text=text, proj_dim=64, proj_hidden=128), batch=8, group_size=4,
                img=32, context=16)


def _step_measure(ctx: Ctx, cfg: dict, model: str, ckpt: bool) -> dict:
    from mixreorg.losses import ContrastiveObjective, MixReorgLoss
    from mixreorg.nn import GroupViT, MixReorg

    B = cfg["batch"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, cfg["img"], cfg["img"], generator=g).to(ctx.device)
    ids = torch.randint(1, 1000, (B, cfg["context"]), generator=g)
    ids[:, -1] = 49407  # EOT: the text tower pools at the arg-max id
    ids = ids.to(ctx.device)
    torch.manual_seed(0)
    net = GroupViT(**cfg["kwargs"])
    if model == "MixReorg":
        net = MixReorg(net, dict(group_size=cfg["group_size"]))
    net = net.to(ctx.device).train()
    net.use_checkpoint = ckpt
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    objective = ContrastiveObjective(multi_label_weight=0.0)  # no prompts are passed
    mix_loss = MixReorgLoss(objective)
    autocast = lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    from _steps import train_step  # after mixreorg is importable (_steps imports it)

    step = lambda: train_step(net, images, ids, opt, objective, mix_loss, autocast)
    step()  # warm-up outside the peak: optimizer state, kernels, allocator
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(ctx, step, iters=1 if ctx.smoke else 5, warmup=0 if ctx.smoke else 1)
    out = dict(ms=ms, img_s=B / ms * 1e3, params_M=sum(p.numel() for p in net.parameters()) / 1e6)
    if ctx.cuda:
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def section_train_step(ctx: Ctx) -> Iterator[dict]:
    if not ctx.cuda and not ctx.smoke:
        yield row("GroupViT-S / MixReorg-S", "skipped", "batch 256 at 224 px needs CUDA (--smoke steps a tiny "
                  f"model on CPU; {no_cuda_reason()})")
        return
    cfg = train_config(ctx)
    note = "" if not ctx.smoke else f"--smoke: tiny model, batch {cfg['batch']}, {cfg['img']} px"
    for ckpt in (False, True):
        ms = {}
        for model in ("GroupViT", "MixReorg"):
            label = model + (" tiny" if ctx.smoke else "-S")
            name = f"{label} checkpointing {'on' if ckpt else 'off'}"
            tags = dict(model=label, checkpointing="on" if ckpt else "off", batch=cfg["batch"], px=cfg["img"])
            if ctx.left() <= 0:
                yield row(name, "skipped", ctx.budget_reason(), **tags)
                continue
            r = guarded(name, lambda model=model, ckpt=ckpt: _step_measure(ctx, cfg, model, ckpt), **tags)
            if r["status"] == "ok":
                ms[model] = r["ms"]
                if model == "MixReorg" and "GroupViT" in ms:
                    r["vs_groupvit"] = _r(r["ms"] / ms["GroupViT"])
                r["reason"] = r["reason"] or note
            gc.collect()
            if ctx.cuda:
                torch.cuda.empty_cache()
            yield r


# ---------------------------------------------------------------------------------------------
# section: torch.compile(fullgraph=True) of the mixer
# ---------------------------------------------------------------------------------------------
def section_compile_mixer(ctx: Ctx) -> Iterator[dict]:
    from mixreorg.nn import MixedPatchMixer
    from mixreorg.ops import has_triton

    if ctx.cuda and not has_triton():
        yield row("compile fullgraph=True", "skipped", "inductor on CUDA needs triton (not installed)")
        return

    B, P, S, C = (32, 16, 8, 32) if ctx.smoke else (256, 196, 64, 384)
    mixer = MixedPatchMixer(16, num_suffix_tokens=S)
    x = torch.randn(B, P + S, C, device=ctx.device, requires_grad=True)
    y = torch.randn(B, P + S, C, device=ctx.device, requires_grad=True)
    g = torch.randn(B, P + S, C, device=ctx.device)
    plan = mixer.make_plan(x, seed=0)

    def f(x, y):
        m, _ = mixer(x, plan)
        return mixer.restore(mixer.mix_add(m, y, plan), plan)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    tags = dict(shape=str([B, P + S, C]), suffix_tokens=S)
    t = time.perf_counter()
    try:
        out = compiled(x, y)
        grads = torch.autograd.grad(out, (x, y), g)
        ctx.sync()
    except Exception as err:
        yield row("compile fullgraph=True: mix -> mix_add -> restore", "fail", _err(err), **tags,
                  traceback=_tail(traceback.format_exc()))
        return
    compile_s = time.perf_counter() - t
    ref = f(x, y)
    ref_grads = torch.autograd.grad(ref, (x, y), g)
    equal = all(same_bits(a, b)[0] for a, b in zip((out, *grads), (ref, *ref_grads)))
    yield row("compile fullgraph=True: mix -> mix_add -> restore", "ok" if equal else "fail",
              "" if equal else "compiled output or gradients differ from eager", **tags, compile_s=compile_s,
              bitwise_equal_to_eager=equal)
    eager_ms = time_ms(ctx, lambda: torch.autograd.grad(f(x, y), (x, y), g))
    comp_ms = time_ms(ctx, lambda: torch.autograd.grad(compiled(x, y), (x, y), g))
    yield row("fwd+bwd compiled vs eager", **tags, eager_ms=eager_ms, compiled_ms=comp_ms,
              speedup=eager_ms / comp_ms)


# ---------------------------------------------------------------------------------------------
# section: torchrun smoke run (nccl)
# ---------------------------------------------------------------------------------------------
NCCL_PROBE = """\
import os, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
dist.init_process_group("nccl")
t = torch.full((4,), float(dist.get_rank() + 1), device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
assert t.tolist() == [float(dist.get_world_size())] * 4, t
print("nccl ok", dist.get_backend(), dist.get_world_size())
dist.destroy_process_group()
"""


def _torchrun_row(ctx: Ctx, name: str, args: list[str], expect: str, cap_s: float, note: str = "") -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]
    rc, out, secs = run_command(ctx, cmd, cap_s)
    meta = dict(seconds=secs, command="torchrun " + shlex.join(cmd[3:]))
    if rc == 0 and expect in out:
        return row(name, "ok", note, **meta)
    error, excerpt = first_error(out)
    if rc is None:
        reason = "timed out"
    else:
        reason = f"exit status {rc}: {error}" if rc else f"exit status 0 but no '{expect}' in the output"
    return row(name, "fail", reason[:300], **meta, output_tail=excerpt)


def section_torchrun(ctx: Ctx) -> Iterator[dict]:
    run_dir = ctx.out / "torchrun_pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["-m", "mixreorg.recipes.pretrain", "--steps", "3", "--out", str(run_dir), "--no-eval", "--quiet",
            "--resume", "no"]
    yield _torchrun_row(ctx, "pretrain, tiny preset, 3 steps", args, "trained 3 steps", cap_s=240,
                        note="one process: the recipe makes no process group for WORLD_SIZE 1, see the nccl row")
    probe = ctx.out / "nccl_probe.py"
    probe.write_text(NCCL_PROBE)
    yield _torchrun_row(ctx, "nccl process group + all_reduce", [str(probe)], "nccl ok", cap_s=120)


SECTIONS = [
    Section("cuda_tests", "CUDA tests (pytest -m cuda)", section_cuda_tests, cuda_only=True, min_s=30),
    Section("bitexact", "Triton vs torch, bit for bit", section_bitexact),
    Section("mix_bench", "mix / restore / mix_add: time, GB/s, ratio to clone", section_mix_bench),
    Section("assign_bench", "Gumbel assignment: fused vs F.gumbel_softmax(hard=True)", section_assign_bench),
    Section("train_step", "Train step: GroupViT-S vs MixReorg-S (bf16 autocast)", section_train_step, min_s=20),
    Section("compile_mixer", "torch.compile(fullgraph=True) of MixedPatchMixer", section_compile_mixer,
            cuda_only=True, min_s=45),
    Section("torchrun", "torchrun smoke run of the pretrain recipe (nccl)", section_torchrun, cuda_only=True,
            min_s=30),
]


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v).replace("|", "\\|").replace("\n", " ")
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def _table(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in DETAIL_KEYS and k != "reason"]
    keys.append("reason")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return lines


def render_markdown(env: dict, results: list[dict], elapsed: float) -> str:
    lines = ["# GPU suite (benchmarks/gpu_suite.py)", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in env.items()]
    lines += [f"| elapsed | {elapsed:.0f} s |", "", "## Sections", "",
              "| section | status | seconds | rows ok / fail / skipped | reason |", "|---|---|---|---|---|"]
    for res in results:
        n = [sum(r["status"] == s for r in res["rows"]) for s in ("ok", "fail", "skipped")]
        lines.append(f"| {res['section']} | {res['status']} | {res['seconds']:.1f} | {n[0]} / {n[1]} / {n[2]} | "
                     f"{_fmt(res['reason'])} |")
    for res in results:
        lines += ["", f"## {res['section']}: {res['title']}", "", f"Status: **{res['status']}**"
                  + (f" ({res['reason']})" if res["reason"] else ""), ""]
        if res["rows"]:
            lines += _table(res["rows"])
        details = [(res["section"], res.get("traceback"))] + [(r["name"], r.get(k)) for r in res["rows"]
                                                              for k in DETAIL_KEYS]
        for name, text in details:
            if text:
                lines += ["", f"{name}:", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def write_reports(ctx: Ctx, env: dict, results: list[dict]) -> str:
    md = render_markdown(env, results, ctx.elapsed())
    payload = dict(env=env, elapsed_s=round(ctx.elapsed(), 1), sections=results,
                   ok=not any(r["status"] == "fail" for r in results))
    (ctx.out / JSON_NAME).write_text(json.dumps(payload, indent=1, default=str))
    (ctx.out / MD_NAME).write_text(md)
    return md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_suite_out", help="folder for gpu_suite.json / gpu_suite.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and iterations (CPU test)")
    p.add_argument("--budget-s", type=float, default=450.0, help="global time budget (default 450 s)")
    p.add_argument("--only", help="comma-separated sections: " + ",".join(s.name for s in SECTIONS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = SECTIONS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {s.name for s in SECTIONS})
        if unknown:
            print(f"error: unknown sections {unknown}; known: {[s.name for s in SECTIONS]}", file=sys.stderr)
            return 2
        sections = [s for s in SECTIONS if s.name in names]
    ctx = Ctx(out=Path(args.out).resolve(), smoke=args.smoke, budget_s=args.budget_s)
    how = bootstrap()
    ctx.out.mkdir(parents=True, exist_ok=True)
    env = environment(ctx, how)
    print(f"gpu_suite: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
          f"{env['mode']} mode, budget {ctx.budget_s:.0f} s; writing {ctx.out}", flush=True)
    results = run_sections(sections, ctx, on_result=lambda res: write_reports(ctx, env, res))
    print(write_reports(ctx, env, results))
    return 1 if any(r["status"] == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
