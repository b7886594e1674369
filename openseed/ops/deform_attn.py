"""Multi-scale deformable attention (Deformable DETR), with a pluggable backend for the sampling kernel.

Shape letters used throughout:
    B batch, Q queries, S value tokens (all levels, flattened level by level, row-major within a level),
    H heads, C channels per head, D = H * C model width, L feature levels, P sampling points per head and level.

Sampling locations are normalised ``(x, y)`` over each level's map: 0 is the left/top edge and 1 the right/bottom
edge, so pixel ``i`` of a level of width ``w`` has its centre at ``(i + 0.5) / w``. Values are read by bilinear
interpolation with zeros outside the map, exactly ``F.grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)`` with ``grid = 2 * loc - 1``.

Backends: ``"torch"`` (always registered, any device and float dtype) and whatever else registers itself through
:func:`register_backend`. ``backend=None`` reads the environment variable ``OPENSEED_DEFORM_ATTN`` (``"auto"``, the
default, or a backend name); ``"auto"`` takes the first backend of ``AUTO_ORDER`` that is registered and available
for the inputs.

``"triton"`` is registered at the end of this module: fused Triton forward and backward kernels
(:mod:`openseed.ops.triton_deform_attn`) for CUDA tensors in fp32, bf16 or fp16 (fp32 accumulation, output in
``value``'s dtype, gradients for value, sampling locations and attention weights). It is available only for such
tensors and when ``triton`` can be imported; the import happens on first use, so importing this module stays cheap
and works without triton or CUDA. With ``"auto"``, CUDA inputs therefore use Triton and every other device (or
dtype, e.g. fp64) uses ``"torch"``; ``OPENSEED_DEFORM_ATTN=torch`` or ``=triton`` (or the ``backend`` argument)
forces one, and forcing ``"triton"`` on inputs it cannot run raises a RuntimeError that names the available ones.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENV_VAR = "OPENSEED_DEFORM_ATTN"
AUTO_ORDER = ("triton", "torch")

BackendFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


class _Backend(NamedTuple):
    fn: BackendFn
    available: Callable[[Tensor], bool]


def _level_shapes(spatial_shapes: Tensor) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with ``F.grid_sample``, one call per level (any device, any float dtype).

    Args:
        value: [B, S, H, C].
        spatial_shapes: long [L, 2], rows ``(h_l, w_l)``.
        level_start_index: long [L], first token of each level in ``value``.
        sampling_locations: [B, Q, H, L, P, 2], normalised ``(x, y)``.
        attention_weights: [B, Q, H, L, P].

    Returns:
        [B, Q, H * C] in ``value``'s dtype; differentiable w.r.t. value, sampling_locations and attention_weights.
        When no gradient is needed the points' weighted sum is accumulated in place (equal up to float rounding,
        ~1e-7 relative, to the differentiable path's product-then-sum).
    """
    batch, _, heads, channels = value.shape
    _, queries, _, _, points, _ = sampling_locations.shape
    # One layout change of the grids and weights for all levels, then per level a view: grids [B, H, L, Q, P, 2]
    # and weights [B, H, L, Q, P]. (The value is rearranged level by level: grid_sample reads a contiguous map
    # faster than a view into all levels' tokens.)
    grids = (2 * sampling_locations - 1).to(value.dtype).permute(0, 2, 3, 1, 4, 5).contiguous()
    weights = attention_weights.to(value.dtype).permute(0, 2, 3, 1, 4).contiguous()
    out = value.new_zeros(batch * heads, channels, queries)
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (value, sampling_locations, attention_weights))
    for level, ((h, w), start) in enumerate(zip(_level_shapes(spatial_shapes), level_start_index.tolist())):
        # [B, h*w, H, C] -> [B*H, C, h, w]
        level_value = value.narrow(1, int(start), h * w).permute(0, 2, 3, 1).reshape(batch * heads, channels, h, w)
        grid = grids[:, :, level].view(batch * heads, queries, points, 2)
        sampled = F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled [B*H, C, Q, P] weighted by [B*H, 1, Q, P], summed over points
        level_weights = weights[:, :, level].view(batch * heads, 1, queries, points)
        if differentiable:
            out = out + (sampled * level_weights).sum(-1)
        else:  # inference: accumulated in place point by point (no [B*H, C, Q, P] product), ~2.5x faster on a CPU
            for point in range(points):
                out.addcmul_(sampled[..., point], level_weights[..., point])
    return out.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


_BACKENDS: dict[str, _Backend] = {"torch": _Backend(ms_deform_attn_pytorch, lambda value: True)}


def register_backend(name: str, fn: BackendFn, available: Callable[[Tensor], bool]) -> None:
    """Register (or replace) a backend.

    Args:
        name: backend name, e.g. ``"triton"``; ``"auto"`` is reserved.
        fn: same signature and result as :func:`ms_deform_attn_pytorch`.
        available: called with ``value`` [B, S, H, C]; True when ``fn`` can run on these inputs (device, dtype).
    """
    if name == "auto":
        raise ValueError('"auto" is reserved and cannot name a backend')
    _BACKENDS[name] = _Backend(fn, available)


def available_backends(value: Tensor | None = None) -> list[str]:
    """Names of the registered backends; with ``value`` [B, S, H, C], only those available for it."""
    return [name for name, b in _BACKENDS.items() if value is None or b.available(value)]


def _select_backend(backend: str | None, value: Tensor) -> BackendFn:
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
    if requested == "auto":
        for name in AUTO_ORDER:
            if name in _BACKENDS and _BACKENDS[name].available(value):
                return _BACKENDS[name].fn
        raise RuntimeError(f"no backend of {AUTO_ORDER} is available; registered: {sorted(_BACKENDS)}")
    if requested not in _BACKENDS:
        raise ValueError(
            f"deformable attention backend {requested!r} (from the {source}) is not registered; "
            f"registered backends: {sorted(_BACKENDS)}, or 'auto'"
        )
    if not _BACKENDS[requested].available(value):
        raise RuntimeError(
            f"deformable attention backend {requested!r} (from the {source}) is not available for value "
            f"on {value.device} with dtype {value.dtype}; available: {available_backends(value)}"
        )
    return _BACKENDS[requested].fn


def _check_shapes(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, H, C], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"value must be a float tensor, got {value.dtype}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be [L, 2], got shape {tuple(spatial_shapes.shape)}")
    levels = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(f"level_start_index must be [L={levels}], got shape {tuple(level_start_index.shape)}")
    batch, tokens, heads, _ = value.shape
    sizes = [h * w for h, w in _level_shapes(spatial_shapes)]
    if tokens != sum(sizes):
        raise ValueError(f"value has S={tokens} tokens but spatial_shapes sum to {sum(sizes)} (sum of h*w)")
    starts = [sum(sizes[:i]) for i in range(levels)]
    if level_start_index.tolist() != starts:
        raise ValueError(f"level_start_index {level_start_index.tolist()} does not match spatial_shapes ({starts})")
    loc_shape = tuple(sampling_locations.shape)
    if len(loc_shape) != 6 or (loc_shape[0], loc_shape[2], loc_shape[3], loc_shape[5]) != (batch, heads, levels, 2):
        raise ValueError(
            f"sampling_locations must be [B={batch}, Q, H={heads}, L={levels}, P, 2], got shape {loc_shape}"
        )
    if tuple(attention_weights.shape) != loc_shape[:5]:
        raise ValueError(
            f"attention_weights must be [B, Q, H, L, P] = {loc_shape[:5]} (from sampling_locations), "
            f"got shape {tuple(attention_weights.shape)}"
        )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention: per head, a weighted sum of bilinear samples over levels and points.

    Args:
        value: [B, S, H, C], S = sum of h_l * w_l, levels flattened one after another in row-major order.
        spatial_shapes: long [L, 2], rows ``(h_l, w_l)``.
        level_start_index: long [L], first token of each level in ``value`` (cumulative sum of h_l * w_l).
        sampling_locations: [B, Q, H, L, P, 2], normalised ``(x, y)`` per level, may lie outside [0, 1]
            (zeros are read there).
        attention_weights: [B, Q, H, L, P], already normalised by the caller.
        backend: a registered backend name, ``"auto"``, or None to read ``OPENSEED_DEFORM_ATTN`` (default ``"auto"``).

    Returns:
        [B, Q, H * C].

    Raises:
        ValueError: a tensor has the wrong shape, or the backend is not registered.
        RuntimeError: the requested backend cannot run on these inputs.
    """
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    fn = _select_backend(backend, value)
    with torch.profiler.record_function("ms_deform_attn"):
        return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module: offsets and weights predicted from the query.

    Args:
        d_model: model width D (divisible by ``n_heads``).
        n_levels: feature levels L.
        n_heads: attention heads H.
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Standard initialisation: head h's offsets start along direction 2*pi*h/H, point p at distance p + 1."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)  # [H, 2]
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, self.n_points, 1)
        grid = directions.view(self.n_heads, 1, 1, 2) * scale  # [H, 1, P, 2]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from each query to P points per head and level around its reference.

        Args:
            query: [B, Q, D].
            reference_points: [B, Q, L, 2] normalised points ``(x, y)`` (offsets are in pixels of each level), or
                [B, Q, L, 4] normalised boxes ``(cx, cy, w, h)`` (offsets are scaled by half the box size / P).
            value_input: [B, S, D], S = sum of h_l * w_l.
            spatial_shapes: long [L, 2], rows ``(h_l, w_l)``.
            level_start_index: long [L].
            padding_mask: bool [B, S], True at padding tokens (their values are zeroed), or None.

        Returns:
            [B, Q, D].
        """
        batch, queries, _ = query.shape
        tokens = value_input.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if spatial_shapes.shape[0] != levels:
            raise ValueError(f"spatial_shapes has {spatial_shapes.shape[0]} levels, the module expects {levels}")
        if tuple(reference_points.shape) not in {(batch, queries, levels, 2), (batch, queries, levels, 4)}:
            raise ValueError(
                f"reference_points must be [B={batch}, Q={queries}, L={levels}, 2 or 4], "
                f"got shape {tuple(reference_points.shape)}"
            )
        value = self.value_proj(value_input)
        if padding_mask is not None:
            if tuple(padding_mask.shape) != (batch, tokens):
                raise ValueError(f"padding_mask must be [B={batch}, S={tokens}], got {tuple(padding_mask.shape)}")
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points).softmax(-1)
        weights = weights.view(batch, queries, heads, levels, points)
        ref = reference_points[:, :, None, :, None, :]  # [B, Q, 1, L, 1, 2 or 4]
        if reference_points.shape[-1] == 2:
            wh = spatial_shapes.flip(-1).to(offsets.dtype)  # [L, 2] as (w, h)
            locations = ref + offsets / wh[None, None, None, :, None, :]
        else:
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


# --- Triton backend (CUDA), registered lazily -------------------------------------------------------------------

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _triton_fn() -> BackendFn | None:
    """The Triton kernel's entry point, imported on first use; None when triton (or the kernel module) is unusable."""
    try:
        from openseed.ops.triton_deform_attn import HAS_TRITON, ms_deform_attn_triton
    except Exception:  # any import problem means "not available", the torch path still works
        return None
    return ms_deform_attn_triton if HAS_TRITON else None


def _triton_available(value: Tensor) -> bool:
    """CUDA tensors in fp32 / bf16 / fp16, and triton importable (checked only for such tensors)."""
    return value.is_cuda and value.dtype in _TRITON_DTYPES and _triton_fn() is not None


def _ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Lazy entry of the ``"triton"`` backend: imports :mod:`openseed.ops.triton_deform_attn` on the first call."""
    fn = _triton_fn()
    if fn is None:
        raise RuntimeError("the Triton deformable attention backend needs the `triton` package, which is not installed")
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


register_backend("triton", _ms_deform_attn_triton, _triton_available)
