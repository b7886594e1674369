"""Checks of the Triton deformable attention kernels that must run in a fresh process (used by
tests/test_triton_deform_attn.py; also runnable by hand).

    TRITON_INTERPRET=1 python tests/_triton_checks.py interp   # kernels on CPU tensors in triton's interpreter
    python tests/_triton_checks.py aot                          # ahead-of-time compilation for sm_80 / sm_90

The interpreter must be switched on before triton is first imported, hence the separate process. Each mode runs all
its checks, prints one line per check, and prints a JSON object ``{check: {"ok": bool, "detail": str}}`` as the last
line of stdout; the exit code is 0 only when every check passed.

The input builders and the float64 reference at the top are shared with the GPU tests.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch

# Levels with different (h, w): non-square, 1 x N and N x 1. Special points that sit exactly on kinks of the bilinear
# interpolation (pixel centres, half a pixel outside) are only placed along power-of-two sizes, where the normalised
# location and its pixel coordinate are exact in fp32, so kernel and float64 reference see the same kink.
LEVELS = [(4, 8), (3, 5), (1, 16), (2, 1)]

INTERP_CHECKS = (
    "fp32_levels_heads_points",
    "fp32_channel_counts",
    "fp32_many_query_blocks",
    "exact_pixel_and_border_reads",
    "far_away_points_read_zero",
    "bf16_forward_backward",
    "fp16_forward_backward",
    "fp64_exact_and_gradcheck",
    "noncontiguous_inputs",
    "partial_gradients",
    "empty_queries",
)

AOT_CASES = tuple(
    f"{kind}_{dtype}_sm{arch}" for kind in ("fwd", "bwd") for dtype in ("fp32", "bf16") for arch in (80, 90)
)


def level_tables(shapes: list[tuple[int, int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``spatial_shapes`` [L, 2] and ``level_start_index`` [L] (long) for the given level sizes."""
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    sizes = spatial.prod(1)
    return spatial, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def _is_pow2(n: int) -> bool:
    return n & (n - 1) == 0


def special_locations(generator, batch, queries, heads, shapes, points) -> torch.Tensor:
    """fp32 [B, Q, H, L, P, 2] locations: random in [-0.3, 1.3] plus exact special points.

    The random locations are multiples of 2**-12, so that ``loc * size - 0.5`` is exact in fp32 for every level size
    up to 2048: the kernel and the float64 reference then agree on which side of a kink (integer pixel coordinate)
    every point lies, even over hundreds of thousands of points (unrounded fp32 locations give a few points per
    million whose floor differs, and there the location gradient legitimately jumps).

    Per level and axis of size n: point 0 at pixel centres (integer pixel coordinates, some one pixel outside the
    map) and point 1 halfway between centres, both only when n is a power of two; the last point of queries 0..6:
    left/top edge 0, right/bottom edge 1, half a pixel outside on either side (power-of-two n only), and 1e4 / -1e4
    / 1e6 (far outside).
    """
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator) * 1.6 - 0.3
    loc = torch.round(loc * 4096) / 4096
    for lvl, (h, w) in enumerate(shapes):
        for axis, n in enumerate((w, h)):
            idx = torch.randint(-1, n + 1, (batch, queries, heads), generator=generator).float()
            if _is_pow2(n):
                loc[:, :, :, lvl, 0, axis] = (idx + 0.5) / n
                if points > 2:
                    loc[:, :, :, lvl, 1, axis] = idx / n
            edges = [0.0, 1.0]
            if _is_pow2(n):
                edges += [-0.5 / n, 1.0 + 0.5 / n]
            edges += [1e4, -1e4, 1e6]
            for q, edge in enumerate(edges[: min(queries, len(edges))]):
                loc[:, q, :, lvl, points - 1, axis] = edge
    return loc


def make_inputs(generator, batch, queries, heads, channels, shapes, points, dtype=torch.float32):
    """``(value, spatial_shapes, level_start_index, locations, weights)`` on CPU; value in ``dtype``."""
    spatial, start = level_tables(shapes)
    tokens = int(spatial.prod(1).sum())
    value = torch.randn(batch, tokens, heads, channels, generator=generator).to(dtype)
    loc = special_locations(generator, batch, queries, heads, shapes, points)
    attn = torch.rand(batch, queries, heads, len(shapes), points, generator=generator)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return value, spatial, start, loc, attn


def reference(value, spatial, start, loc, attn, grad_out):
    """float64 PyTorch path: output and the gradients of value, locations and weights for ``grad_out``."""
    from openseed.ops.deform_attn import ms_deform_attn_pytorch

    inputs = [t.detach().to(torch.float64).requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_pytorch(inputs[0], spatial, start, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad_out.to(torch.float64))
    return (out.detach(), *grads)


def run_triton(fn, value, spatial, start, loc, attn, grad_out):
    """Output and the three gradients of ``fn`` (a kernel entry point) for ``grad_out``."""
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(inputs[0], spatial, start, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad_out)
    return (out.detach(), *grads)


def assert_close(name, actual, expected, rtol, atol_scale=None):
    """``|actual - expected| <= atol + rtol * |expected|`` with atol = rtol * max(1, max |expected|) by default."""
    expected = expected.to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    atol = rtol * scale if atol_scale is None else atol_scale
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (max abs err {float(err.max()):.3g}, "
            f"atol {atol:.3g}, rtol {rtol}); first at flat index {i}: {float(actual.flatten()[i])!r} vs "
            f"{float(expected.flatten()[i])!r}"
        )
    return float(err.max()) if err.numel() else 0.0


def compare_all(fn, inputs, rtol, grad_rtols=None, seed=0):
    """Run ``fn`` and the float64 reference on ``inputs``; check output and the three gradients; return errors."""
    value, spatial, start, loc, attn = inputs
    g = torch.Generator(device="cpu").manual_seed(seed)
    batch, queries = loc.shape[:2]
    heads, channels = value.shape[2:]
    grad_out = torch.randn(batch, queries, heads * channels, generator=g).to(value.device, value.dtype)
    got = run_triton(fn, value, spatial, start, loc, attn, grad_out)
    want = reference(value, spatial, start, loc, attn, grad_out)
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    dtypes = (value.dtype, value.dtype, loc.dtype, attn.dtype)
    rtols = (rtol, *(grad_rtols or (rtol, rtol, rtol)))
    errors = {}
    for name, a, e, dt, tol in zip(names, got, want, dtypes, rtols):
        if a.dtype != dt:
            raise AssertionError(f"{name}: dtype {a.dtype}, expected {dt}")
        errors[name] = assert_close(name, a, e, tol)
    return errors


# --- interpreter checks ---------------------------------------------------------------------------------------------


def _fn():
    from openseed.ops.triton_deform_attn import ms_deform_attn_triton

    return ms_deform_attn_triton


def check_fp32_levels_heads_points():
    g = torch.Generator().manual_seed(0)
    return compare_all(_fn(), make_inputs(g, 2, 10, 2, 5, LEVELS, 3), rtol=1e-5)


def check_fp32_channel_counts():
    g = torch.Generator().manual_seed(1)
    errors = {}
    for channels, heads, shapes, points in [(3, 1, [(4, 4)], 2), (17, 3, [(2, 4), (1, 8)], 1), (32, 1, [(2, 2)], 3)]:
        errs = compare_all(_fn(), make_inputs(g, 1, 7, heads, channels, shapes, points), rtol=1e-5, seed=channels)
        errors[f"C={channels}"] = max(errs.values())
    return errors


def check_fp32_many_query_blocks():
    from openseed.ops.triton_deform_attn import INTERPRET_BLOCK_Q

    g = torch.Generator().manual_seed(2)
    queries = 4 * INTERPRET_BLOCK_Q + 3  # several programs along the queries, the last one partly masked
    return compare_all(_fn(), make_inputs(g, 1, queries, 1, 4, [(2, 8)], 1), rtol=1e-5)


def check_exact_pixel_and_border_reads():
    """Pixel centres read the pixel; on the border / partly outside only the in-map corners contribute."""
    spatial, start = level_tables([(2, 3)])
    value = torch.arange(1, 7, dtype=torch.float32).view(1, 6, 1, 1)  # rows [1 2 3], [4 5 6]
    points = [
        ((1.5 / 3, 0.5 / 2), 2.0),  # centre of pixel (0, 1)
        ((2.5 / 3, 1.5 / 2), 6.0),  # centre of pixel (1, 2)
        ((0.0, 0.5 / 2), 0.5 * 1.0),  # left edge: half of pixel (0, 0), the other half is padding
        ((1.0, 1.0), 0.25 * 6.0),  # bottom-right corner: a quarter of pixel (1, 2)
        ((0.5 / 3, 0.0), 0.5 * 1.0),  # top edge above pixel (0, 0)
        ((-0.5 / 3, 0.5 / 2), 0.0),  # half a pixel outside: every weight on the padding
        ((-1.0, 0.5), 0.0),
        ((0.5, 2.0), 0.0),
    ]
    loc = torch.tensor([p for p, _ in points], dtype=torch.float32).view(1, len(points), 1, 1, 1, 2)
    attn = torch.ones(1, len(points), 1, 1, 1)
    out = _fn()(value, spatial, start, loc, attn).flatten().tolist()
    expected = [e for _, e in points]
    if max(abs(a - e) for a, e in zip(out, expected)) > 1e-6:
        raise AssertionError(f"got {out}, expected {expected}")
    return {"values": out}


def check_far_away_points_read_zero():
    """Points far outside (up to 1e30, and inf) give zero output and zero gradients: no overflow, no NaN."""
    g = torch.Generator().manual_seed(3)
    inf = float("inf")
    far = torch.tensor([[1e30, 0.5], [-1e30, -1e30], [0.5, 1e8], [-1e8, 3.0], [inf, 0.5], [0.5, -inf]])  # [Q, 2]
    queries = far.shape[0]
    value, spatial, start, _, attn = make_inputs(g, 1, queries, 2, 3, [(3, 5), (2, 2)], 2)
    loc = far.view(1, queries, 1, 1, 1, 2).expand(1, queries, 2, 2, 2, 2).contiguous()
    out, gv, gl, ga = run_triton(_fn(), value, spatial, start, loc, attn, torch.ones(1, queries, 6))
    for name, t in (("output", out), ("grad_value", gv), ("grad_loc", gl), ("grad_attn", ga)):
        if not torch.equal(t, torch.zeros_like(t)):
            raise AssertionError(f"{name} is not all zero: max |.| = {float(t.abs().max())}")
    return {"ok": True}


def _low_precision(dtype, rtol):
    g = torch.Generator().manual_seed(4)
    value, spatial, start, loc, attn = make_inputs(g, 1, 6, 2, 3, [(2, 4), (3, 5)], 2, dtype=dtype)
    # value and output gradient in dtype (rounding of the result to dtype); location / weight gradients are
    # accumulated in fp32 from the same dtype-exact inputs, so they stay close to the float64 reference.
    errors = compare_all(_fn(), (value, spatial, start, loc, attn), rtol=rtol, grad_rtols=(rtol, 1e-4, 1e-4))
    # locations / weights in the low-precision dtype too: their gradients come back in that dtype
    loc_h, attn_h = loc.to(dtype), attn.to(dtype)
    out, gv, gl, ga = run_triton(_fn(), value, spatial, start, loc_h, attn_h, torch.ones(1, 6, 6, dtype=dtype))
    got = [(t.dtype, tuple(t.shape)) for t in (out, gv, gl, ga)]
    want = [(dtype, (1, 6, 6)), (dtype, tuple(value.shape)), (dtype, tuple(loc.shape)), (dtype, tuple(attn.shape))]
    if got != want:
        raise AssertionError(f"dtypes/shapes {got}, expected {want}")
    if not all(bool(torch.isfinite(t).all()) for t in (out, gv, gl, ga)):  # 1e6 is inf in fp16: still finite results
        raise AssertionError("non-finite output or gradient")
    return errors


def check_bf16_forward_backward():
    return _low_precision(torch.bfloat16, 1e-2)


def check_fp16_forward_backward():
    return _low_precision(torch.float16, 2e-3)


def kink_free_inputs(generator, shapes, batch=1, queries=2, heads=2, channels=2, points=2, dtype=torch.float64):
    """Inputs whose pixel coordinates are i + f with f in [0.15, 0.85] (away from the kinks), for gradcheck."""
    spatial, start = level_tables(shapes)
    tokens = int(spatial.prod(1).sum())
    value = torch.randn(batch, tokens, heads, channels, generator=generator, dtype=dtype)
    loc = torch.empty(batch, queries, heads, len(shapes), points, 2, dtype=dtype)
    for lvl, (h, w) in enumerate(shapes):
        for axis, size in enumerate((w, h)):
            whole = torch.randint(-1, size + 1, loc[:, :, :, lvl, :, axis].shape, generator=generator)
            frac = 0.15 + 0.7 * torch.rand(whole.shape, generator=generator, dtype=dtype)
            loc[:, :, :, lvl, :, axis] = (whole + frac + 0.5) / size
    attn = torch.rand(batch, queries, heads, len(shapes), points, generator=generator, dtype=dtype)
    return value, spatial, start, loc, attn


def check_fp64_exact_and_gradcheck():
    g = torch.Generator().manual_seed(5)
    value, spatial, start, loc, attn = make_inputs(g, 1, 5, 2, 3, LEVELS[:3], 2)
    inputs = (value.double(), spatial, start, loc.double(), attn.double())
    errors = compare_all(_fn(), inputs, rtol=1e-12)
    value, spatial, start, loc, attn = kink_free_inputs(g, [(2, 3), (1, 2)], queries=1, heads=1)
    fn = _fn()

    def f(v, sampling_locations, attention_weights):
        return fn(v, spatial, start, sampling_locations, attention_weights)

    ok = torch.autograd.gradcheck(f, (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()), eps=1e-6,
                                  atol=1e-8)  # fmt: skip
    if not ok:
        raise AssertionError("gradcheck failed")
    errors["gradcheck"] = 0.0
    return errors


def check_noncontiguous_inputs():
    g = torch.Generator().manual_seed(6)
    value, spatial, start, loc, attn = make_inputs(g, 1, 5, 2, 3, [(2, 4), (1, 3)], 2)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, channels not innermost
    loc_big = torch.cat([loc, loc + 0.1], 4)[:, :, :, :, :2]  # a slice with padded strides
    attn_t = torch.stack([attn, attn + 1], -1)[..., 0]
    assert not (value_t.is_contiguous() or loc_big.is_contiguous() or attn_t.is_contiguous())
    return compare_all(_fn(), (value_t, spatial, start, loc_big, attn_t), rtol=1e-5)


def check_partial_gradients():
    """Only value needs a gradient (locations / weights are constants), and the other way round."""
    g = torch.Generator().manual_seed(7)
    value, spatial, start, loc, attn = make_inputs(g, 1, 5, 2, 3, [(2, 4), (1, 3)], 2)
    grad_out = torch.randn(1, 5, 6, generator=g)
    _, rv, rl, ra = reference(value, spatial, start, loc, attn, grad_out)
    fn = _fn()
    v = value.clone().requires_grad_()
    (gv,) = torch.autograd.grad(fn(v, spatial, start, loc, attn), [v], grad_out)
    errors = {"value_only": assert_close("grad_value (value only)", gv, rv, 1e-5)}
    lo, at = loc.clone().requires_grad_(), attn.clone().requires_grad_()
    gl, ga = torch.autograd.grad(fn(value, spatial, start, lo, at), [lo, at], grad_out)
    errors["loc_only"] = assert_close("grad_loc (no value grad)", gl, rl, 1e-5)
    errors["attn_only"] = assert_close("grad_attn (no value grad)", ga, ra, 1e-5)
    return errors


def check_empty_queries():
    g = torch.Generator().manual_seed(8)
    value, spatial, start, loc, attn = make_inputs(g, 2, 3, 2, 3, [(2, 4)], 2)
    loc, attn = loc[:, :0], attn[:, :0]
    v = value.clone().requires_grad_()
    out = _fn()(v, spatial, start, loc, attn)
    if tuple(out.shape) != (2, 0, 6):
        raise AssertionError(f"shape {tuple(out.shape)}")
    out.sum().backward()
    if not torch.equal(v.grad, torch.zeros_like(v)):
        raise AssertionError("grad_value is not zero")
    return {"shape": list(out.shape)}


# --- ahead-of-time compilation --------------------------------------------------------------------------------------


def aot_case(case: str) -> dict:
    """Compile one kernel for one target; check PTX target / entry, the cubin, vector loads and atomics."""
    from openseed.ops.triton_deform_attn import aot_compile

    kind, dtype, arch = case.split("_")
    arch_n = int(arch[2:])
    value_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    kernel = aot_compile(kind == "bwd", value_dtype, arch_n)
    ptx = kernel.asm["ptx"]
    name = "_ms_deform_attn_bwd_kernel" if kind == "bwd" else "_ms_deform_attn_fwd_kernel"
    target = ".target sm_90a" if arch_n == 90 else f".target sm_{arch_n}"
    if target not in ptx:
        raise AssertionError(f"{target!r} not in the PTX")
    if f".entry {name}(" not in ptx:
        raise AssertionError(f".entry {name} not in the PTX")
    cubin = kernel.asm.get("cubin", b"")
    if not (isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF" and len(cubin) > 1000):
        raise AssertionError(f"no cubin (ELF) produced: {type(cubin).__name__} of {len(cubin)} bytes")
    if "ld.global.v4" not in ptx:
        raise AssertionError("value rows are not read with 128-bit vector loads (ld.global.v4)")
    if kind == "bwd" and "add.f32" not in ptx.replace(".v4.f32", ".f32").replace(".v2.f32", ".f32"):
        raise AssertionError("no fp32 atomic add in the backward PTX")
    return {"ptx_chars": len(ptx), "cubin_bytes": len(cubin), "num_warps": kernel.metadata.num_warps}


# --- runner -------------------------------------------------------------------------------------------------------


def run(mode: str) -> dict:
    if mode == "interp":
        cases = {name: globals()[f"check_{name}"] for name in INTERP_CHECKS}
    elif mode == "aot":
        cases = {case: (lambda case=case: aot_case(case)) for case in AOT_CASES}
    else:
        raise SystemExit(f"usage: {sys.argv[0]} interp|aot")
    results = {}
    for name, check in cases.items():
        t0 = time.perf_counter()
        try:
            detail = check()
            results[name] = {"ok": True, "detail": json.dumps(detail, default=str)}
        except Exception:  # every failure is reported, the other checks still run
            results[name] = {"ok": False, "detail": traceback.format_exc(limit=8)}
        status = "ok" if results[name]["ok"] else "FAILED"
        print(f"{name}: {status} ({time.perf_counter() - t0:.1f} s) {results[name]['detail']}", flush=True)
    return results


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "interp"
    if mode == "interp":
        from openseed.ops.triton_deform_attn import interpreter_enabled

        if not interpreter_enabled():
            raise SystemExit("set TRITON_INTERPRET=1 for the interpreter checks")
    results = run(mode)
    print(json.dumps(results))
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)
