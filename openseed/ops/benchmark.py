"""Benchmark of the multi-scale deformable attention implementations: ``python -m openseed.ops.benchmark``.

Shapes (B = 2, levels of a 1024 px image at strides 8 / 16 / 32 / 64: (128, 128), (64, 64), (32, 32), (16, 16),
S = 21 760 tokens, 8 heads x 32 channels, 4 points per head and level):

* ``encoder``: every token is a query (Q = S);
* ``decoder300`` / ``decoder900``: Q = 300 / 900 queries over the same value.

Rows: the Triton kernel (fp32, bf16, fp16 value), the PyTorch ``grid_sample`` path (fp32, bf16) and, when the
extension ``MultiScaleDeformableAttention`` of Deformable DETR is importable, its CUDA op (fp32, im2col_step 64).
Sampling locations and attention weights are fp32 in every row. Columns: median forward and forward + backward time
(CUDA events, after warm-up; no cache flush between runs), the peak memory allocated above what was allocated before
the call, the max abs difference of the output from the fp32 PyTorch path, and the forward bandwidth counting value
read once, locations and weights read once and the output written once (a lower bound on the real traffic: bilinear
gathers read value rows several times, mostly from L2), also as a percentage of the GPU's peak DRAM bandwidth where
the device is in :data:`PEAK_BANDWIDTH_GBS`.

Without CUDA the command says so, runs a tiny CPU sanity comparison of the PyTorch path (fp32 against fp64) and exits
with 0.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from openseed.cli import Option, command, integer, path, some_of
from openseed.ops.deform_attn import ms_deform_attn_pytorch

LEVELS_1024 = ((128, 128), (64, 64), (32, 32), (16, 16))
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4
SHAPES = {"encoder": None, "decoder300": 300, "decoder900": 900}  # None: Q = S (every token queries)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Peak DRAM bandwidth (GB/s) by device name; the first entry whose words all appear in the name wins.
PEAK_BANDWIDTH_GBS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4800.0),
    (("H100", "PCIE"), 2000.0),
    (("H100", "SXM"), 3350.0),
    (("H100", "HBM3"), 3350.0),  # H100 SXM reports itself as "NVIDIA H100 80GB HBM3"
    (("A100", "80GB"), 2039.0),
    (("A100", "40GB"), 1555.0),
)


def peak_bandwidth_gbs(device_name: str) -> float | None:
    """Peak DRAM bandwidth of a device from :data:`PEAK_BANDWIDTH_GBS`, None when unknown."""
    name = device_name.upper()
    for words, gbs in PEAK_BANDWIDTH_GBS:
        if all(word in name for word in words):
            return gbs
    return None


def make_inputs(queries: int | None, device: torch.device | str, levels=LEVELS_1024, batch=BATCH, heads=HEADS,
                channels=CHANNELS, points=POINTS, seed: int = 0) -> dict[str, Tensor]:  # fmt: skip
    """fp32 inputs: value [B, S, H, C], shapes / starts, locations [B, Q, H, L, P, 2] in [0, 1], softmaxed weights."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    spatial = torch.tensor(levels, dtype=torch.long)
    sizes = spatial.prod(1)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens = int(sizes.sum())
    queries = tokens if queries is None else queries
    value = torch.randn(batch, tokens, heads, channels, generator=g)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=g)
    attn = torch.randn(batch, queries, heads, len(levels) * points, generator=g).softmax(-1)
    attn = attn.view(batch, queries, heads, len(levels), points)
    grad = torch.randn(batch, queries, heads * channels, generator=g)
    tensors = {"value": value, "spatial": spatial, "start": start, "loc": loc, "attn": attn, "grad": grad}
    return {k: v.to(device) for k, v in tensors.items()}


def forward_bytes(inputs: dict[str, Tensor], dtype: torch.dtype) -> int:
    """Bytes the forward pass must move at least: value read once, locations / weights read, output written."""
    item = torch.tensor([], dtype=dtype).element_size()
    value, loc, attn = inputs["value"], inputs["loc"], inputs["attn"]
    batch, _, heads, channels = value.shape
    queries = loc.shape[1]
    return (value.numel() + batch * queries * heads * channels) * item + (loc.numel() + attn.numel()) * 4


class Impl:
    """One benchmarked implementation: ``forward(value, loc, attn)`` and ``grads(value, loc, attn, grad)``."""

    def __init__(self, name: str, dtype: str, forward: Callable, grads: Callable) -> None:
        self.name, self.dtype, self.forward, self.grads = name, dtype, forward, grads


def _autograd_impl(name: str, dtype: str, fn: Callable, spatial: Tensor, start: Tensor) -> Impl:
    def forward(value, loc, attn):
        with torch.no_grad():
            return fn(value, spatial, start, loc, attn)

    def grads(value, loc, attn, grad):
        inputs = [value.detach().requires_grad_(), loc.detach().requires_grad_(), attn.detach().requires_grad_()]
        out = fn(inputs[0], spatial, start, inputs[1], inputs[2])
        return torch.autograd.grad(out, inputs, grad.to(out.dtype))

    return Impl(name, dtype, forward, grads)


def _msda_impl(spatial: Tensor, start: Tensor, im2col_step: int = 64) -> Impl | None:
    try:
        import MultiScaleDeformableAttention as MSDA  # noqa: N814 - the extension's conventional alias
    except ImportError:
        return None

    def forward(value, loc, attn):
        return MSDA.ms_deform_attn_forward(value, spatial, start, loc, attn, im2col_step)

    def grads(value, loc, attn, grad):
        out = MSDA.ms_deform_attn_forward(value, spatial, start, loc, attn, im2col_step)
        return MSDA.ms_deform_attn_backward(value, spatial, start, loc, attn, grad.to(out.dtype).contiguous(),
                                            im2col_step)  # fmt: skip

    return Impl("CUDA op (MSDA)", "fp32", forward, grads)


def build_impls(spatial: Tensor, start: Tensor, dtypes: Sequence[str]) -> tuple[list[Impl], list[str]]:
    """Implementations to benchmark for the requested dtypes, and notes on the ones that are missing."""
    impls: list[Impl] = []
    notes: list[str] = []
    try:
        from openseed.ops.triton_deform_attn import HAS_TRITON, ms_deform_attn_triton
    except Exception as err:  # a broken triton install must not stop the other rows
        HAS_TRITON, ms_deform_attn_triton = False, None
        notes.append(f"Triton kernel not importable: {err}")
    if HAS_TRITON:
        impls += [_autograd_impl("Triton", d, ms_deform_attn_triton, spatial, start) for d in ("fp32", "bf16", "fp16")]
    elif not notes:
        notes.append("Triton kernel skipped: triton is not installed")
    impls += [_autograd_impl("PyTorch", d, ms_deform_attn_pytorch, spatial, start) for d in ("fp32", "bf16")]
    msda = _msda_impl(spatial, start)
    if msda is not None:
        impls.append(msda)
    else:
        notes.append("CUDA op row skipped: `MultiScaleDeformableAttention` is not importable")
    return [impl for impl in impls if impl.dtype in dtypes], notes


def time_cuda_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median time of ``fn`` in milliseconds, measured with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        events.append((begin, end))
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated by ``fn`` above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(impl: Impl, inputs: dict[str, Tensor], reference: Tensor, warmup: int, repeats: int,
            peak_gbs: float | None) -> dict:  # fmt: skip
    """Error, times, peak memory and bandwidth of one implementation on one set of (fp32) inputs."""
    dtype = DTYPES[impl.dtype]
    value, loc, attn, grad = inputs["value"].to(dtype), inputs["loc"], inputs["attn"], inputs["grad"].to(dtype)
    forward = functools.partial(impl.forward, value, loc, attn)
    grads = functools.partial(impl.grads, value, loc, attn, grad)
    row: dict = {"impl": impl.name, "dtype": impl.dtype, "queries": loc.shape[1], "tokens": value.shape[1]}
    try:
        row["max_abs_err"] = float((forward().float() - reference).abs().max())
        row["fwd_ms"] = time_cuda_ms(forward, warmup, repeats)
        row["fwd_bwd_ms"] = time_cuda_ms(grads, warmup, repeats)
        row["fwd_peak_mib"] = peak_mib(forward)
        row["fwd_bwd_peak_mib"] = peak_mib(grads)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        torch.cuda.empty_cache()
        return row
    gbs = forward_bytes(inputs, dtype) / (row["fwd_ms"] * 1e-3) / 1e9
    row["fwd_gbs"] = gbs
    row["fwd_pct_peak"] = 100.0 * gbs / peak_gbs if peak_gbs else None
    return row


def bench_shape(shape: str, dtypes: Sequence[str], warmup: int, repeats: int, peak_gbs: float | None,
                seed: int, device: str = "cuda") -> tuple[list[dict], list[str]]:  # fmt: skip
    """All rows of one shape, and notes on the implementations that were skipped."""
    inputs = make_inputs(SHAPES[shape], device, seed=seed)
    spatial, start = inputs["spatial"], inputs["start"]
    with torch.no_grad():
        reference = ms_deform_attn_pytorch(inputs["value"], spatial, start, inputs["loc"], inputs["attn"]).float()
    impls, notes = build_impls(spatial, start, dtypes)
    rows = [{"shape": shape, **measure(impl, inputs, reference, warmup, repeats, peak_gbs)} for impl in impls]
    return rows, notes


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = [
        "| shape | Q | impl | dtype | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | max abs err "
        "| fwd GB/s | % of peak |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['queries']} | {r['impl']} | {r['dtype']} | {r['error']} |||||||")
            continue
        pct = "unknown" if r.get("fwd_pct_peak") is None else f"{r['fwd_pct_peak']:.1f}"
        lines.append(
            f"| {r['shape']} | {r['queries']} | {r['impl']} | {r['dtype']} | {_fmt(r.get('fwd_ms'), '.3f')} "
            f"| {_fmt(r.get('fwd_bwd_ms'), '.3f')} | {_fmt(r.get('fwd_peak_mib'), '.1f')} "
            f"| {_fmt(r.get('fwd_bwd_peak_mib'), '.1f')} | {_fmt(r.get('max_abs_err'), '.2e')} "
            f"| {_fmt(r.get('fwd_gbs'), '.0f')} | {pct} |"
        )
    return "\n".join(lines)


def cpu_sanity() -> dict:
    """Tiny CPU comparison of the PyTorch path, fp32 against fp64 (what can be checked without a GPU)."""
    inputs = make_inputs(12, "cpu", levels=((8, 8), (4, 4)), batch=1, heads=2, channels=8, points=2)
    args = (inputs["spatial"], inputs["start"])
    t0 = time.perf_counter()
    out32 = ms_deform_attn_pytorch(inputs["value"], *args, inputs["loc"], inputs["attn"])
    seconds = time.perf_counter() - t0
    out64 = ms_deform_attn_pytorch(inputs["value"].double(), *args, inputs["loc"].double(), inputs["attn"].double())
    return {"max_abs_err": float((out32.double() - out64).abs().max()), "ms": 1e3 * seconds,
            "shape": list(out32.shape)}  # fmt: skip


OPTIONS = {
    "dtype": Option(f"value dtypes, from {list(DTYPES)}", list(DTYPES), some_of(DTYPES)),
    "shapes": Option(f"shapes, from {list(SHAPES)}", ["encoder", "decoder300", "decoder900"], some_of(SHAPES)),
    "repeats": Option("timed runs per measurement (the median is reported)", 50, integer(1)),
    "warmup": Option("untimed runs before each measurement", 10, integer(0)),
    "out": Option("a JSON file to write the results to as well", None, path),
    "seed": Option("the inputs' seed", 0, integer(0)),
}


@command(OPTIONS, "python -m openseed.ops.benchmark", __doc__)
def main(args) -> int:
    """Run the benchmark (or, without CUDA, the CPU sanity check); print markdown; return the exit code (2: a
    mistake in the arguments, named on stderr)."""
    result: dict = {"torch": torch.__version__}
    if not torch.cuda.is_available():
        print("CUDA is not available: the GPU benchmark was skipped (it needs a CUDA device).")
        sanity = cpu_sanity()
        ok = sanity["max_abs_err"] < 1e-4
        print("CPU sanity check of the PyTorch path (fp32 vs fp64, tiny shapes):\n")
        print("| check | output shape | max abs err | time ms | status |\n|---|---|---:|---:|---|")
        print(f"| PyTorch fp32 vs fp64 | {sanity['shape']} | {sanity['max_abs_err']:.2e} | {sanity['ms']:.2f} "
              f"| {'ok' if ok else 'FAILED'} |")  # fmt: skip
        result.update(cuda=False, cpu_sanity=sanity, rows=[])
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return 0 if ok else 1

    device_name = torch.cuda.get_device_name()
    peak = peak_bandwidth_gbs(device_name)
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    print(f"Device: {device_name} (peak DRAM bandwidth: {'unknown' if peak is None else f'{peak:.0f} GB/s'}); "
          f"torch {torch.__version__}, triton {result['triton']}; median of {args.repeats} runs after "
          f"{args.warmup} warm-up runs\n")  # fmt: skip
    rows: list[dict] = []
    notes: set[str] = set()
    for shape in args.shapes:
        shape_rows, shape_notes = bench_shape(shape, args.dtype, args.warmup, args.repeats, peak, args.seed)
        rows += shape_rows
        notes.update(shape_notes)
        torch.cuda.empty_cache()
    print(markdown_table(rows))
    for note in sorted(notes):
        print(f"\nNote: {note}")
    result.update(cuda=True, device=device_name, peak_gbs=peak, repeats=args.repeats, warmup=args.warmup, rows=rows,
                  notes=sorted(notes))  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
