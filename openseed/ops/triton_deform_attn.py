"""Triton kernels for multi-scale deformable attention (forward and backward).

:func:`ms_deform_attn_triton` has the signature and the result of
:func:`openseed.ops.deform_attn.ms_deform_attn_pytorch` (shape letters and the sampling convention are described
there): for every query, head, level and point it reads a bilinear sample of ``value`` at the normalised location
``(x, y)`` (pixel coordinate ``x * w - 0.5``, zeros outside the map, each of the four neighbours counted only when it
lies inside the map, exactly like ``F.grid_sample(align_corners=False, padding_mode="zeros")``), multiplies it by
the attention weight and sums over levels and points.

Kernel design:

* one program handles ``BLOCK_Q`` queries of one (batch, head) pair and all ``C`` channels of that head (``C`` padded
  to a power of two ``BLOCK_C`` with masks, so any channel count works); it loops over levels and (unrolled) points
  and gathers the four neighbouring ``[BLOCK_Q, BLOCK_C]`` rows of ``value`` with contiguous vector loads along the
  channels;
* all arithmetic is done in the compute dtype: fp32 for fp32 / bf16 / fp16 ``value`` (sampling locations and
  attention weights are converted to fp32, the output is stored in ``value``'s dtype), fp64 for fp64 ``value``;
* the backward kernel recomputes the bilinear weights and writes the gradients of the sampling locations and the
  attention weights directly (each is owned by exactly one program); the gradient of ``value`` is scattered with
  atomic adds into a scratch buffer in the compute dtype (fp32 atomics are more accurate than bf16 / fp16 ones and
  the Triton CPU interpreter has no half-precision atomics), then cast to ``value``'s dtype.

On a GPU the block sizes come from a small heuristic (:func:`_launch_config`); under the Triton CPU interpreter
(``TRITON_INTERPRET=1`` set before triton is imported, CPU tensors) a fixed configuration is used. The module
imports without triton and without CUDA; :data:`HAS_TRITON` says whether the kernels exist.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

try:  # triton is optional: the PyTorch path covers every device without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None
    tl = None

HAS_TRITON = triton is not None

#: ``value`` dtypes the kernels accept; fp64 runs fully in fp64 (useful for gradcheck), the others accumulate in fp32.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: Fixed query block used by the CPU interpreter (small, so that tests exercise several programs and masking).
INTERPRET_BLOCK_Q = 8


def interpreter_enabled() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


if HAS_TRITON:

    @triton.jit
    def _bilinear_corners(loc_x, loc_y, height, width, start, active):
        """Token indices, in-map flags and bilinear weights of the four neighbours of normalised ``(x, y)``.

        ``loc_x``, ``loc_y`` and ``active`` are ``[BLOCK_Q]``; ``height``, ``width``, ``start`` are the level's
        int32 shape and first token. Corner order: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
        Returns the fractional parts ``fx``, ``fy`` and their complements ``gx = 1 - fx``, ``gy = 1 - fy`` too (the
        backward pass needs them).
        """
        width_f = width.to(loc_x.dtype)
        height_f = height.to(loc_x.dtype)
        x = loc_x * width_f - 0.5
        y = loc_y * height_f - 0.5
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        fx = x - x0f
        fy = y - y0f
        # Clamp before the integer conversion so far-away points cannot overflow; [-2, size] keeps both neighbours
        # of a clamped coordinate outside the map.
        x0 = tl.minimum(tl.maximum(x0f, -2.0), width_f).to(tl.int32)
        y0 = tl.minimum(tl.maximum(y0f, -2.0), height_f).to(tl.int32)
        x1 = x0 + 1
        y1 = y0 + 1
        in_x0 = (x0 >= 0) & (x0 < width)
        in_x1 = (x1 >= 0) & (x1 < width)
        in_y0 = active & (y0 >= 0) & (y0 < height)
        in_y1 = active & (y1 >= 0) & (y1 < height)
        # A coordinate with no in-map neighbour contributes nothing; zeroing its fractional part keeps inf / NaN
        # locations from turning the zero contributions (and gradients) into NaN.
        fx = tl.where(in_x0 | in_x1, fx, 0.0)
        fy = tl.where(in_y0 | in_y1, fy, 0.0)
        in00 = in_y0 & in_x0
        in01 = in_y0 & in_x1
        in10 = in_y1 & in_x0
        in11 = in_y1 & in_x1
        row0 = start + y0 * width
        row1 = row0 + width
        # Out-of-map corners point at token 0 (always a valid address); their loads and stores are masked anyway.
        t00 = tl.where(in00, row0 + x0, 0)
        t01 = tl.where(in01, row0 + x1, 0)
        t10 = tl.where(in10, row1 + x0, 0)
        t11 = tl.where(in11, row1 + x1, 0)
        gx = 1.0 - fx
        gy = 1.0 - fy
        return t00, t01, t10, t11, in00, in01, in10, in11, gy * gx, gy * fx, fy * gx, fy * fx, fx, fy, gx, gy

    @triton.jit
    def _program_tile(num_queries, num_heads, channels, num_tokens, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
        """The tile of program (i, b * H + h): queries ``[i * BLOCK_Q, (i + 1) * BLOCK_Q)`` of head h, all channels.

        Returns the (b, q, h) row indices (int64, so large batches cannot overflow the flattened offsets), the query
        and channel indices with their masks, the offset of head h of batch b in a ``[B, S, H, C]`` tensor and the
        stride between its tokens.
        """
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_mask = q < num_queries
        c = tl.arange(0, BLOCK_C)
        c_mask = c < channels
        row = (b.to(tl.int64) * num_queries + q) * num_heads + h
        head_offset = (b.to(tl.int64) * num_tokens * num_heads + h) * channels
        return row, q_mask, c, c_mask, head_offset, num_heads * channels

    @triton.jit
    def _load_point(loc_ptr, attn_ptr, row, q_mask, lvl, p, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr):
        """Index into ``[B, Q, H, L, P]`` of point p of level lvl for the tile's rows, its location and weight."""
        lp = row * (NUM_LEVELS * NUM_POINTS) + lvl * NUM_POINTS + p
        loc_x = tl.load(loc_ptr + 2 * lp, mask=q_mask, other=0.0)
        loc_y = tl.load(loc_ptr + 2 * lp + 1, mask=q_mask, other=0.0)
        a = tl.load(attn_ptr + lp, mask=q_mask, other=0.0)
        return lp, loc_x, loc_y, a

    @triton.jit
    def _gather_rows(value_base, token, inside, token_stride, c, c_mask, ACC: tl.constexpr):
        """``value`` rows ``[BLOCK_Q, BLOCK_C]`` of one head at the given tokens, zero where ``inside`` is False."""
        ptrs = value_base + token[:, None] * token_stride + c[None, :]
        return tl.load(ptrs, mask=inside[:, None] & c_mask[None, :], other=0.0).to(ACC)

    @triton.jit
    def _ms_deform_attn_fwd_kernel(
        value_ptr,  # [B, S, H, C], value dtype
        shapes_ptr,  # int32 [L, 2], rows (h, w)
        starts_ptr,  # int32 [L]
        loc_ptr,  # [B, Q, H, L, P, 2], compute dtype
        attn_ptr,  # [B, Q, H, L, P], compute dtype
        out_ptr,  # [B, Q, H, C], value dtype
        num_queries,
        num_heads,
        channels,
        num_tokens,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Forward pass: program (i, b * H + h) writes queries ``[i * BLOCK_Q, (i + 1) * BLOCK_Q)`` of head h."""
        ACC: tl.constexpr = loc_ptr.dtype.element_ty
        row, q_mask, c, c_mask, head_offset, token_stride = _program_tile(
            num_queries, num_heads, channels, num_tokens, BLOCK_Q, BLOCK_C
        )
        value_base = value_ptr + head_offset
        acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
        for lvl in range(NUM_LEVELS):
            height = tl.load(shapes_ptr + 2 * lvl)
            width = tl.load(shapes_ptr + 2 * lvl + 1)
            start = tl.load(starts_ptr + lvl)
            for p in tl.static_range(NUM_POINTS):
                lp, loc_x, loc_y, a = _load_point(loc_ptr, attn_ptr, row, q_mask, lvl, p, NUM_LEVELS, NUM_POINTS)
                t00, t01, t10, t11, in00, in01, in10, in11, w00, w01, w10, w11, fx, fy, gx, gy = _bilinear_corners(
                    loc_x, loc_y, height, width, start, q_mask
                )
                sample = w00[:, None] * _gather_rows(value_base, t00, in00, token_stride, c, c_mask, ACC)
                sample += w01[:, None] * _gather_rows(value_base, t01, in01, token_stride, c, c_mask, ACC)
                sample += w10[:, None] * _gather_rows(value_base, t10, in10, token_stride, c, c_mask, ACC)
                sample += w11[:, None] * _gather_rows(value_base, t11, in11, token_stride, c, c_mask, ACC)
                acc += a[:, None] * sample
        out_ptrs = out_ptr + row[:, None] * channels + c[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & c_mask[None, :])

    @triton.jit
    def _scatter_rows(grad_value_base, token, inside, token_stride, c, c_mask, update):
        """Atomically add ``update`` [BLOCK_Q, BLOCK_C] to the ``grad_value`` rows of one head at ``token``."""
        ptrs = grad_value_base + token[:, None] * token_stride + c[None, :]
        tl.atomic_add(ptrs, update, mask=inside[:, None] & c_mask[None, :], sem="relaxed")

    @triton.jit
    def _ms_deform_attn_bwd_kernel(
        value_ptr,  # [B, S, H, C], value dtype
        shapes_ptr,  # int32 [L, 2]
        starts_ptr,  # int32 [L]
        loc_ptr,  # [B, Q, H, L, P, 2], compute dtype
        attn_ptr,  # [B, Q, H, L, P], compute dtype
        grad_out_ptr,  # [B, Q, H, C], value dtype
        grad_value_ptr,  # [B, S, H, C], compute dtype, zero-initialised (accumulated with atomics)
        grad_loc_ptr,  # [B, Q, H, L, P, 2], compute dtype
        grad_attn_ptr,  # [B, Q, H, L, P], compute dtype
        num_queries,
        num_heads,
        channels,
        num_tokens,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_C: tl.constexpr,
        VALUE_GRAD: tl.constexpr,
    ):
        """Backward pass over the same grid as the forward: gradients of locations, weights and (optionally) value.

        With ``g`` the output gradient of one query and head, ``a`` the point's attention weight and ``s`` its
        bilinear sample: ``d/da = <g, s>``; ``d/dx = a * w * <g, (1 - fy) (v01 - v00) + fy (v11 - v10)>`` and
        ``d/dy = a * h * <g, (1 - fx) (v10 - v00) + fx (v11 - v01)>`` (out-of-map corners read 0, and the factor
        ``w`` / ``h`` is d(pixel coordinate)/d(normalised coordinate)); ``d/dv_k += a * w_k * g`` at each in-map
        corner ``k``.
        """
        ACC: tl.constexpr = loc_ptr.dtype.element_ty
        row, q_mask, c, c_mask, head_offset, token_stride = _program_tile(
            num_queries, num_heads, channels, num_tokens, BLOCK_Q, BLOCK_C
        )
        value_base = value_ptr + head_offset
        grad_value_base = grad_value_ptr + head_offset
        tile_mask = q_mask[:, None] & c_mask[None, :]
        g = tl.load(grad_out_ptr + row[:, None] * channels + c[None, :], mask=tile_mask, other=0.0).to(ACC)
        for lvl in range(NUM_LEVELS):
            height = tl.load(shapes_ptr + 2 * lvl)
            width = tl.load(shapes_ptr + 2 * lvl + 1)
            start = tl.load(starts_ptr + lvl)
            for p in tl.static_range(NUM_POINTS):
                lp, loc_x, loc_y, a = _load_point(loc_ptr, attn_ptr, row, q_mask, lvl, p, NUM_LEVELS, NUM_POINTS)
                t00, t01, t10, t11, in00, in01, in10, in11, w00, w01, w10, w11, fx, fy, gx, gy = _bilinear_corners(
                    loc_x, loc_y, height, width, start, q_mask
                )
                v00 = _gather_rows(value_base, t00, in00, token_stride, c, c_mask, ACC)
                v01 = _gather_rows(value_base, t01, in01, token_stride, c, c_mask, ACC)
                v10 = _gather_rows(value_base, t10, in10, token_stride, c, c_mask, ACC)
                v11 = _gather_rows(value_base, t11, in11, token_stride, c, c_mask, ACC)
                sample = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
                grad_a = tl.sum(g * sample, axis=1)
                d_fx = tl.sum(g * (gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)), axis=1)
                d_fy = tl.sum(g * (gx[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)), axis=1)
                tl.store(grad_attn_ptr + lp, grad_a, mask=q_mask)
                tl.store(grad_loc_ptr + 2 * lp, d_fx * a * width.to(ACC), mask=q_mask)
                tl.store(grad_loc_ptr + 2 * lp + 1, d_fy * a * height.to(ACC), mask=q_mask)
                if VALUE_GRAD:
                    ga = g * a[:, None]
                    _scatter_rows(grad_value_base, t00, in00, token_stride, c, c_mask, ga * w00[:, None])
                    _scatter_rows(grad_value_base, t01, in01, token_stride, c, c_mask, ga * w01[:, None])
                    _scatter_rows(grad_value_base, t10, in10, token_stride, c, c_mask, ga * w10[:, None])
                    _scatter_rows(grad_value_base, t11, in11, token_stride, c, c_mask, ga * w11[:, None])


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton deformable attention backend needs the `triton` package, which is not installed")


@functools.lru_cache(maxsize=16)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(value: Tensor, queries: int, batch_heads: int, channels: int) -> tuple[int, int, int]:
    """``(BLOCK_Q, BLOCK_C, num_warps)`` for these inputs.

    Interpreter (CPU tensors): a fixed small configuration. GPU: a tile of about 2048 elements (64 queries of a
    32-channel head), halved down to 16 queries while the grid would not give every SM two programs (decoder-sized
    inputs with a few hundred queries), and one warp per 512 tile elements (2 to 8).
    """
    block_c = triton.next_power_of_2(max(channels, 1))
    if not value.is_cuda:
        return INTERPRET_BLOCK_Q, block_c, 1
    block_q = max(1, min(64, 2048 // block_c))
    sms = _multiprocessor_count(value.device.index if value.device.index is not None else torch.cuda.current_device())
    while block_q > 16 and triton.cdiv(queries, block_q) * batch_heads < 2 * sms:
        block_q //= 2
    num_warps = max(2, min(8, block_q * block_c // 512))
    return block_q, block_c, num_warps


def _compute_dtype(value: Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


#: CUDA's limit on the second grid dimension, which enumerates (batch, head) pairs.
MAX_BATCH_HEADS = 65535


def _check_device(value: Tensor) -> None:
    _require_triton()
    if value.shape[0] * value.shape[2] > MAX_BATCH_HEADS:
        raise ValueError(f"B * H = {value.shape[0] * value.shape[2]} exceeds {MAX_BATCH_HEADS} (CUDA grid limit)")
    per_batch = value.shape[1] * value.shape[2] * value.shape[3]
    if per_batch >= 2**31:
        raise ValueError(f"S * H * C = {per_batch} does not fit the kernel's int32 offsets within a batch")
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernel supports value dtypes {SUPPORTED_DTYPES}, got {value.dtype}")
    if not value.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"the Triton kernel needs CUDA tensors (value is on {value.device}); on CPU it only runs under the "
            "Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )


def _level_tables(spatial_shapes: Tensor, level_start_index: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    shapes = spatial_shapes.to(device=device, dtype=torch.int32).contiguous()
    starts = level_start_index.to(device=device, dtype=torch.int32).contiguous()
    return shapes, starts


class _MSDeformAttnTriton(torch.autograd.Function):
    """Autograd wrapper: forward kernel, and a backward kernel for value, sampling locations and attention weights."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, tokens, heads, channels = value.shape
        _, queries, _, levels, points, _ = sampling_locations.shape
        compute = _compute_dtype(value)
        value_c = value.contiguous()
        loc = sampling_locations.to(compute).contiguous()
        attn = attention_weights.to(compute).contiguous()
        shapes, starts = _level_tables(spatial_shapes, level_start_index, value.device)
        out = torch.empty(batch, queries, heads, channels, device=value.device, dtype=value.dtype)
        ctx.save_for_backward(value_c, shapes, starts, loc, attn)
        ctx.dtypes = (sampling_locations.dtype, attention_weights.dtype)
        if out.numel() > 0:
            block_q, block_c, num_warps = _launch_config(value, queries, batch * heads, channels)
            grid = (triton.cdiv(queries, block_q), batch * heads)
            with torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext():
                _ms_deform_attn_fwd_kernel[grid](
                    value_c, shapes, starts, loc, attn, out, queries, heads, channels, tokens,
                    NUM_LEVELS=levels, NUM_POINTS=points, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=num_warps,
                )  # fmt: skip
        return out.view(batch, queries, heads * channels)

    @staticmethod
    def backward(ctx, grad_output):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        loc_dtype, attn_dtype = ctx.dtypes
        batch, tokens, heads, channels = value.shape
        _, queries, _, levels, points, _ = loc.shape
        value_grad = ctx.needs_input_grad[0]
        grad_out = grad_output.to(value.dtype).contiguous()
        grad_value = torch.zeros(value.shape, device=value.device, dtype=loc.dtype) if value_grad else None
        grad_loc = torch.empty_like(loc)  # every element is written by exactly one program
        grad_attn = torch.empty_like(attn)
        if loc.numel() > 0:  # also with C = 0, where the location / weight gradients are zeros
            block_q, block_c, num_warps = _launch_config(value, queries, batch * heads, channels)
            grid = (triton.cdiv(queries, block_q), batch * heads)
            scratch = grad_value if grad_value is not None else grad_loc  # never written when VALUE_GRAD is False
            with torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext():
                _ms_deform_attn_bwd_kernel[grid](
                    value, shapes, starts, loc, attn, grad_out, scratch, grad_loc, grad_attn,
                    queries, heads, channels, tokens,
                    NUM_LEVELS=levels, NUM_POINTS=points, BLOCK_Q=block_q, BLOCK_C=block_c,
                    VALUE_GRAD=value_grad, num_warps=num_warps,
                )  # fmt: skip
        return (
            grad_value.to(value.dtype) if grad_value is not None else None,
            None,
            None,
            grad_loc.to(loc_dtype) if ctx.needs_input_grad[3] else None,
            grad_attn.to(attn_dtype) if ctx.needs_input_grad[4] else None,
        )


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with the Triton kernels (CUDA tensors, or CPU under the interpreter).

    Args:
        value: [B, S, H, C] in fp32, bf16, fp16 (fp32 accumulation) or fp64 (fp64 throughout).
        spatial_shapes: long [L, 2], rows ``(h_l, w_l)``.
        level_start_index: long [L], first token of each level in ``value``.
        sampling_locations: [B, Q, H, L, P, 2], normalised ``(x, y)``; converted to fp32 (fp64 for fp64 value).
        attention_weights: [B, Q, H, L, P]; converted like the locations.

    Returns:
        [B, Q, H * C] in ``value``'s dtype; differentiable w.r.t. value, sampling_locations and attention_weights
        (their gradients come back in their own dtypes).

    Raises:
        RuntimeError: triton is not installed, or the tensors are not on CUDA outside the interpreter.
        TypeError: ``value`` has an unsupported dtype.
        ValueError: more than 65535 (batch, head) pairs, or ``S * H * C >= 2**31`` (int32 offsets in a batch).
    """
    _check_device(value)
    return _MSDeformAttnTriton.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def aot_compile(backward: bool, value_dtype: torch.dtype, arch: int, *, levels: int = 4, points: int = 4,
                block_q: int = 64, block_c: int = 32, num_warps: int = 4):  # fmt: skip
    """Compile the forward or backward kernel ahead of time for ``sm_<arch>`` without a GPU (for checks and tooling).

    Args:
        backward: compile the backward kernel instead of the forward one.
        value_dtype: dtype of ``value`` (and of the output / output gradient); fp32 compute, fp64 for fp64.
        arch: CUDA compute capability as an int, e.g. 80 or 90.
        levels, points, block_q, block_c, num_warps: the compile-time constants.

    Returns:
        triton's ``CompiledKernel``: ``.asm`` holds ``"ptx"`` and, where triton's bundled ``ptxas`` works, ``"cubin"``.
    """
    _require_triton()
    from triton.backends.compiler import GPUTarget

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    vt = names[value_dtype]
    ct = "fp64" if value_dtype == torch.float64 else "fp32"
    ints = {"num_queries": "i32", "num_heads": "i32", "channels": "i32", "num_tokens": "i32"}
    consts = {"NUM_LEVELS": levels, "NUM_POINTS": points, "BLOCK_Q": block_q, "BLOCK_C": block_c}
    if backward:
        kernel = _ms_deform_attn_bwd_kernel
        pointers = {
            "value_ptr": f"*{vt}", "shapes_ptr": "*i32", "starts_ptr": "*i32", "loc_ptr": f"*{ct}",
            "attn_ptr": f"*{ct}", "grad_out_ptr": f"*{vt}", "grad_value_ptr": f"*{ct}", "grad_loc_ptr": f"*{ct}",
            "grad_attn_ptr": f"*{ct}",
        }  # fmt: skip
        consts["VALUE_GRAD"] = True
    else:
        kernel = _ms_deform_attn_fwd_kernel
        pointers = {
            "value_ptr": f"*{vt}", "shapes_ptr": "*i32", "starts_ptr": "*i32", "loc_ptr": f"*{ct}",
            "attn_ptr": f"*{ct}", "out_ptr": f"*{vt}",
        }  # fmt: skip
    signature = {**pointers, **ints, **{name: "constexpr" for name in consts}}
    missing = set(kernel.arg_names) ^ set(signature)
    if missing:
        raise AssertionError(f"AOT signature out of date with the kernel arguments: {sorted(missing)}")
    # What the JIT would specialise for typical inputs: 16-byte aligned pointers and a channel count divisible by 16
    # (e.g. C = 32), which lets the compiler use vector loads along the channels.
    aligned = [name for name in pointers] + ["channels"]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
