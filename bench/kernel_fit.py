"""Will every Triton kernel configuration fit the GPU? Compile them for sm_80 and sm_90 without a GPU and check.

Triton's compiler needs no device: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs
the whole pipeline down to ptxas and reports the shared memory the kernel needs and, in ptxas's log, its
registers and spills. A configuration the interpreter runs happily can still fail at launch on a real GPU
(`OutOfResources: shared memory`) or crawl there (kilobytes of register spills), and no CPU test would notice.

What "every configuration the GPU path can choose" means is decided by the host code, not by a list kept
here: the registered kernel implementations are driven through their real wrappers (forward, backward and
decode, every dtype and head dim their capabilities allow) with `record_launches` in place, which records
each `kernel[grid](...)` call instead of launching it and lets the wrappers' CUDA checks pass for CPU
tensors. Tile choices are therefore exactly those `choose_config` & co. make on a GPU (`interpreting()` is
false: this module refuses to run under `TRITON_INTERPRET=1`).

Each recorded launch is bound and specialised as Triton's JIT would bind it (pointer alignment, integers
divisible by 16), so the compiled kernel is the one a launch would build. Results are cached in a JSON
file keyed by Triton's own source hash, target and options, so unchanged kernels are never recompiled.

    python -m bench.kernel_fit            # one launch per distinct tile shape and flags (what CI runs)
    python -m bench.kernel_fit --all      # every recorded configuration (about 20 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "LIMITS",
    "Recording",
    "SPILL_BUDGET_BYTES",
    "CompileResult",
    "Launch",
    "cache_key",
    "compile_all",
    "compile_launch",
    "distinct_tile_shapes",
    "record_launches",
    "recorded_launches",
]

# Most dynamic shared memory one block may use (the opt-in maximum): A100 163 KB, H100/H200 227 KB.
LIMITS = {80: 163 * 1024, 90: 227 * 1024}
# Spill stores tolerated per program, by input width: a few registers' worth for 16-bit kernels (the speed
# dtypes; ptxas spills a handful of bytes even in kernels that run at full speed), 4 KB for fp32 ones, whose
# exact (`ieee`) products run on the FMA units with every operand in registers: fp32 is the GPU's correctness
# dtype. Tens of kilobytes, as the first fp32 tiles produced (2-80 KB), make a kernel slow at any width.
SPILL_BUDGET_BYTES = {2: 1024, 4: 4096}
HEAD_DIMS = (32, 64, 96, 128, 192, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SEQ_LEN = 512  # long enough that every tile takes its full size (tiles shrink only for short inputs)
# Committed, so CI recompiles only kernels whose source (Triton's hash covers it) or launch options changed.
DEFAULT_CACHE = Path("results/baselines/kernel_fit.json")


@dataclass(frozen=True)
class Launch:
    """One `kernel[grid](*args, **kwargs)` call the host code made, and which cell made it."""

    fn: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    origin: str

    @property
    def name(self) -> str:
        """`module.kernel` (e.g. `flash_bwd._dq_kernel`): kernel names alone repeat across modules."""
        return f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"

    def constexprs(self) -> dict:
        return {p.name: self.kwargs[p.name] for p in self.fn.params if p.is_constexpr and p.name in self.kwargs}

    def tile_shape(self) -> tuple:
        """What decides the kernel's resources: its tiles (`BLOCK_*`) and flags (boolean constexprs: a causal
        mask or a decay changes register pressure as much as a tile does: the full sweep found 13 KB spills in
        flag variants of tile shapes that fit), warps, stages and element width. Head dims are left out: they
        only pad up to the tiles."""
        tiles = tuple(
            sorted((k, v) for k, v in self.constexprs().items() if k.startswith("BLOCK") or isinstance(v, bool))
        )
        # fp16 and bf16 tiles take the same room: the first tensor's element size stands for the dtype.
        width = next(a.element_size() for a in self.args if isinstance(a, torch.Tensor))
        return (self.name, tiles, self.kwargs.get("num_warps"), self.kwargs.get("num_stages"), width)


@dataclass(frozen=True)
class CompileResult:
    kernel: str
    arch: int
    origin: str
    config: str
    shared_bytes: int | None
    registers: int | None
    spill_bytes: int | None
    seconds: float
    error: str = ""
    element_bytes: int = 2  # width of the kernel's inputs, which sets its spill budget
    known: str = ""  # why its kernel module accepts this configuration over budget (`GPU_FIT_KNOWN`)

    def problems(self) -> list[str]:
        """Why this configuration would fail or crawl on its target; empty when it fits."""
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.shared_bytes is not None and self.shared_bytes > LIMITS[self.arch]:
            out.append(f"shared memory {self.shared_bytes / 1024:.1f} KB > {LIMITS[self.arch] // 1024} KB")
        budget = SPILL_BUDGET_BYTES[self.element_bytes]
        if self.spill_bytes is not None and self.spill_bytes > budget:
            out.append(f"spills {self.spill_bytes} B > {budget} B")
        return out

    def fails(self) -> bool:
        """Over a limit and not a limitation its kernel module states."""
        return bool(self.problems()) and not self.known

    def line(self) -> str:
        verdict = "; ".join(self.problems()) or "fits"
        if self.known and self.problems():
            verdict += f" (known: {self.known})"
        return (
            f"sm_{self.arch} {self.kernel} {self.config}: shared {self.shared_bytes} B, regs {self.registers}, "
            f"spills {self.spill_bytes} B -> {verdict}  [{self.origin}]"
        )


class Recording:
    """The launches recorded so far, each labelled with the cell that made it (`at`)."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.cell = ""

    def at(self, cell: str) -> None:
        self.cell = cell


@contextlib.contextmanager
def record_launches() -> Iterator[Recording]:
    """Record every Triton launch instead of running it, and let the kernels' CUDA checks accept CPU tensors.

    Outputs of recorded kernels stay uninitialised: the host code around them must not depend on their values
    for its launch decisions (none here does: tiles depend on shapes, dtypes and the method's parameters).
    """
    from triton.runtime.jit import JITFunction

    import methods.kernels.common as common

    if common.interpreting():
        raise RuntimeError("kernel_fit needs compiled kernels: unset TRITON_INTERPRET (it is 1 here)")
    recording = Recording()

    def record(self, *args, grid, warmup, **kwargs):
        recording.launches.append(Launch(self, args, dict(kwargs), recording.cell))

    real_check, real_run = common.require_cuda, JITFunction.run
    # Every module that imported the check by name gets the stand-in, so the wrappers accept CPU tensors.
    patched = [m for m in list(sys.modules.values()) if getattr(m, "require_cuda", None) is real_check]
    JITFunction.run = record
    for module in patched:
        module.require_cuda = lambda device: None
    try:
        yield recording
    finally:
        JITFunction.run = real_run
        for module in patched:
            module.require_cuda = real_check


def _cells() -> Iterator[tuple[str, str, torch.dtype, int, bool, str]]:
    """(method, impl, dtype, head_dim, causal, mode) for every kernel implementation and what it claims."""
    from methods import METHODS

    for name, spec in METHODS.items():
        for impl, impl_spec in spec.impls.items():
            if impl_spec.kind != "kernel":
                continue
            caps = impl_spec.capabilities
            modes = ["fwd"] + (["fwd_bwd"] if caps.backward else []) + (["decode"] if caps.decode else [])
            for dtype in DTYPES:
                if str(dtype).removeprefix("torch.") not in caps.dtypes:
                    continue
                for head_dim in HEAD_DIMS:
                    for causal in [c for c, ok in ((False, caps.non_causal), (True, caps.causal)) if ok]:
                        for mode in modes:
                            if mode == "decode" and not causal:
                                continue
                            yield name, impl, dtype, head_dim, causal, mode


def _drive(name: str, impl: str, dtype: torch.dtype, head_dim: int, causal: bool, mode: str) -> None:
    """Run one cell through the method's public interface (no timing, no checks): the launches it makes."""
    from methods import build, get_method

    attn = build(name, impl=impl)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, SEQ_LEN, head_dim, generator=gen).to(dtype) for _ in range(3))
    if mode == "decode":
        state = attn.prefill(k, v)
        attn.decode_step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)
        return
    names = set(get_method(name).impls[impl].capabilities.grad_inputs)
    leaves = [t.requires_grad_(mode == "fwd_bwd" and n in names) for n, t in zip("qkv", (q, k, v), strict=True)]
    out = attn(*leaves, causal=causal)
    if mode == "fwd_bwd":
        wanted = [t for t in leaves if t.requires_grad]
        torch.autograd.grad(out, wanted, torch.ones_like(out))


def recorded_launches(methods: list[str] | None = None) -> tuple[list[Launch], list[str]]:
    """Every launch the kernel implementations make over the cells of `_cells`, and the cells that refused."""
    from methods.base import Unsupported

    refused: list[str] = []
    with record_launches() as recording:
        for cell in _cells():
            name, impl, dtype, head_dim, causal, mode = cell
            if methods and name not in methods:
                continue
            label = f"{name}/{impl} {str(dtype).removeprefix('torch.')} D={head_dim} {'causal' if causal else 'full'} {mode}"
            recording.at(label)
            try:
                _drive(*cell)
            except (Unsupported, ValueError) as exc:
                refused.append(f"{label}: {exc}")
    return recording.launches, refused


def distinct_tile_shapes(launches: list[Launch]) -> list[Launch]:
    """One launch per tile shape (kernel, tiles, flags, warps, stages, width): the subset CI compiles."""
    seen: dict[tuple, Launch] = {}
    for launch in launches:
        seen.setdefault(launch.tile_shape(), launch)
    return list(seen.values())


def _describe(launch: Launch) -> str:
    c = launch.constexprs()
    parts = [f"{k}={v}" for k, v in c.items() if v is not None and not isinstance(v, bool)]
    parts += [k for k, v in c.items() if v is True]
    dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in launch.args if isinstance(a, torch.Tensor)})
    opts = f"w{launch.kwargs.get('num_warps')} s{launch.kwargs.get('num_stages')}"
    return f"[{'/'.join(dtypes)} {opts} {' '.join(parts)}]"


def _source(launch: Launch, arch: int):
    """The ASTSource, target and options a real launch of `launch` on `arch` would compile."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options.__dict__


def cache_key(src, arch: int, options: dict) -> str:
    """Triton's source hash (kernel and callee source, signature, constants, specialisation), target, options.

    Paths (libdevice's, inside the virtualenv) are left out so that the key is the same in every clone.
    """
    portable = {k: v for k, v in options.items() if k != "extern_libs"}
    options_hash = hashlib.sha256(json.dumps(portable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{src.hash()[:32]}-sm{arch}-{options_hash}"


def compile_launch(launch: Launch, arch: int) -> CompileResult:
    """Compile `launch` for `arch` (80 or 90) and read its shared memory, registers and spills."""
    import triton
    from triton import knobs

    src, target, options = _source(launch, arch)
    log = io.StringIO()
    start = time.perf_counter()
    error = ""
    shared = regs = spills = None
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report (registers, spills) is printed, not returned
        knobs.compilation.always_compile = True  # a hit in Triton's own cache would print no report
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=target, options=options)
            shared = int(compiled.metadata.shared)
            found = re.findall(r"Used (\d+) registers", log.getvalue())
            regs = max(map(int, found)) if found else None
            spills = sum(map(int, re.findall(r"(\d+) bytes spill stores", log.getvalue())))
        except Exception as exc:  # noqa: BLE001 - any compiler failure is this configuration's verdict
            text = str(exc).strip()
            error = text.splitlines()[0][:300] if text else type(exc).__name__
    seconds = round(time.perf_counter() - start, 2)
    width = launch.tile_shape()[-1]
    return CompileResult(
        launch.name,
        arch,
        launch.origin,
        _describe(launch),
        shared,
        regs,
        spills,
        seconds,
        error,
        width,
        known(launch, arch),
    )


def known(launch: Launch, arch: int) -> str:
    """The reason the kernel's module gives for accepting `launch` on `arch` over budget, or "".

    A kernel module may define `GPU_FIT_KNOWN`: a list of `(kernel name, arch, {constexpr: value}, reason)`
    for configurations it has measured over budget and could not fix, so they are reported, never hidden,
    and the gate still fails on any other.
    """
    module = sys.modules.get(getattr(launch.fn, "__module__", ""))
    constexprs = launch.constexprs()
    for name, target, match, reason in getattr(module, "GPU_FIT_KNOWN", []):
        if name == launch.fn.__name__ and target == arch and all(constexprs.get(k) == v for k, v in match.items()):
            return reason
    return ""


_MEASURED = ("shared_bytes", "registers", "spill_bytes", "seconds", "error", "element_bytes")  # what is cached
_PENDING: list[tuple[Launch, int]] = []  # what the forked compile workers read (launches hold unpicklable kernels)


def _compile_pending(index: int) -> CompileResult:
    launch, arch = _PENDING[index]
    return compile_launch(launch, arch)


def compile_all(launches: list[Launch], archs: list[int], cache: dict, jobs: int = 1) -> list[CompileResult]:
    """Results for every (launch, arch): from `cache` when its key is there, else compiled (in `jobs` processes)
    and added to `cache`. Launches that compile to the same kernel share one compilation."""
    keyed: dict[str, tuple[Launch, int]] = {}
    order: list[tuple[str, Launch, int]] = []
    for launch in launches:
        for arch in archs:
            key = cache_key(*_source(launch, arch))
            keyed.setdefault(key, (launch, arch))
            order.append((key, launch, arch))
    missing = [key for key in keyed if key not in cache]
    _PENDING[:] = [keyed[key] for key in missing]
    if jobs > 1 and len(missing) > 1:
        context = multiprocessing.get_context("fork")  # children inherit the recorded launches
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            fresh = list(pool.map(_compile_pending, range(len(missing))))
    else:
        fresh = [_compile_pending(i) for i in range(len(missing))]
    _PENDING.clear()
    for key, result in zip(missing, fresh, strict=True):
        cache[key] = {k: getattr(result, k) for k in _MEASURED}
    # The cache holds what compiling measured; names, origin and what the module states are read now.
    return [
        CompileResult(launch.name, arch, launch.origin, _describe(launch), **cache[key], known=known(launch, arch))
        for key, launch, arch in order
    ]


def _load_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError) as exc:
        print(f"kernel_fit: ignoring unreadable cache {path}: {exc}", file=sys.stderr)
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_fit", description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every recorded configuration, not one per tile shape")
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(LIMITS), choices=sorted(LIMITS))
    parser.add_argument("--methods", nargs="+", help="only these methods' kernels")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="JSON cache of compiled results")
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = parser.parse_args(argv)

    launches, refused = recorded_launches(args.methods)
    chosen = launches if args.all else distinct_tile_shapes(launches)
    print(f"kernel_fit: {len(launches)} launches recorded, {len(chosen)} to compile for sm_{args.arch}")
    for line in refused:
        print(f"  refused: {line}")
    cache = _load_cache(args.cache)
    started = time.perf_counter()
    results = compile_all(chosen, args.arch, cache, jobs=args.jobs)
    for result in results:
        if result.problems():
            print(f"  {'FAIL' if result.fails() else 'KNOWN'} {result.line()}")
    print(f"kernel_fit: compiled in {time.perf_counter() - started:.0f} s")
    # The cache keeps what this run used: entries of kernels edited since are dropped, not carried forever.
    used = {cache_key(*_source(launch, arch)) for launch in chosen for arch in args.arch}
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    args.cache.write_text(json.dumps({k: v for k, v in cache.items() if k in used}, indent=0, sort_keys=True))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    failed = [r for r in results if r.fails()]
    over = sum(bool(r.problems()) for r in results)
    print(
        f"kernel_fit: {len(results) - over} of {len(results)} compiled configurations fit, "
        f"{over - len(failed)} over budget as their kernel states (GPU_FIT_KNOWN), {len(failed)} fail"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_fit compiles kernels for the GPU: run it without TRITON_INTERPRET=1")
    sys.exit(main())
