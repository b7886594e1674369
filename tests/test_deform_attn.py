"""Multi-scale deformable attention: PyTorch path vs a hand-written bilinear reference, gradients, dispatch, module."""

from __future__ import annotations

import math

import pytest
import torch

from openseed.ops import MSDeformAttn, available_backends, ms_deform_attn, register_backend
from openseed.ops import deform_attn as da

SHAPES = [(3, 5), (2, 3), (1, 1)]


def _shapes(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial.prod(1)
    return spatial, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def naive_ms_deform_attn(value, shapes, sampling_locations, attention_weights):
    """Explicit loops: bilinear interpolation from the four neighbouring pixels, zero outside the map."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    out = torch.zeros(batch, queries, heads, channels, dtype=value.dtype)
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(levels)]
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for lvl, (hl, wl) in enumerate(shapes):
                    for p in range(points):
                        # continuous pixel coordinates: pixel i has its centre at i (align_corners=False)
                        x = sampling_locations[b, q, h, lvl, p, 0].item() * wl - 0.5
                        y = sampling_locations[b, q, h, lvl, p, 1].item() * hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        neighbours = [
                            (y0, x0, (1 - fy) * (1 - fx)),
                            (y0, x0 + 1, (1 - fy) * fx),
                            (y0 + 1, x0, fy * (1 - fx)),
                            (y0 + 1, x0 + 1, fy * fx),
                        ]
                        sample = torch.zeros(channels, dtype=value.dtype)
                        for yy, xx, weight in neighbours:
                            if 0 <= xx < wl and 0 <= yy < hl:
                                sample += weight * value[b, starts[lvl] + yy * wl + xx, h]
                        out[b, q, h] += attention_weights[b, q, h, lvl, p].item() * sample
    return out.reshape(batch, queries, heads * channels)


def _special_locations(generator, batch, queries, heads, shapes, points):
    """Random locations in [-0.3, 1.3], with pixel centres, integer pixel coordinates and map edges mixed in."""
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=torch.float64)
    loc = loc * 1.6 - 0.3
    for lvl, (h, w) in enumerate(shapes):
        size = torch.tensor([w, h], dtype=torch.float64)
        ix = torch.randint(-1, w + 1, (batch, queries, heads, 1), generator=generator)
        iy = torch.randint(-1, h + 1, (batch, queries, heads, 1), generator=generator)
        idx = torch.cat([ix, iy], -1).to(torch.float64)
        loc[:, :, :, lvl, 0] = (idx + 0.5) / size  # pixel centres (some outside the map)
        loc[:, :, :, lvl, 1] = idx / size  # integer pixel coordinates: between pixel centres
        loc[:, 0, :, lvl, 2] = 0.0  # top-left edge
        loc[:, 1, :, lvl, 2] = 1.0  # bottom-right edge
        loc[:, 2, :, lvl, 2] = -0.5 / size  # half a pixel outside: weight lands on the zero padding only
    return loc


def test_pytorch_path_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    batch, queries, heads, channels, points = 2, 4, 3, 5, 4
    spatial, start = _shapes(SHAPES)
    tokens = int(spatial.prod(1).sum())
    value = torch.randn(batch, tokens, heads, channels, generator=g, dtype=torch.float64)
    loc = _special_locations(g, batch, queries, heads, SHAPES, points)
    attn = torch.rand(batch, queries, heads, len(SHAPES), points, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)

    out = ms_deform_attn(value, spatial, start, loc, attn, backend="torch")
    expected = naive_ms_deform_attn(value, SHAPES, loc, attn)
    assert out.shape == (batch, queries, heads * channels)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    direct = da.ms_deform_attn_pytorch(value, spatial, start, loc, attn)  # no gradient: accumulated in place
    torch.testing.assert_close(direct, expected, rtol=0, atol=1e-12)
    differentiable = da.ms_deform_attn_pytorch(value.clone().requires_grad_(), spatial, start, loc, attn)
    assert differentiable.requires_grad
    torch.testing.assert_close(differentiable.detach(), expected, rtol=0, atol=1e-12)


def test_pixel_centre_reads_the_pixel_and_far_outside_reads_zero():
    spatial, start = _shapes([(2, 3)])
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)
    loc = torch.tensor([(1.5 / 3, 0.5 / 2), (2.5 / 3, 1.5 / 2), (-1.0, 0.5), (0.5, 2.0)], dtype=torch.float64)
    loc = loc.view(1, 4, 1, 1, 1, 2)
    out = ms_deform_attn(value, spatial, start, loc, torch.ones(1, 4, 1, 1, 1, dtype=torch.float64))
    assert out.flatten().tolist() == [1.0, 5.0, 0.0, 0.0]


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 3), (1, 2)]
    batch, queries, heads, channels, points = 1, 2, 2, 3, 2
    spatial, start = _shapes(shapes)
    tokens = int(spatial.prod(1).sum())
    value = torch.randn(batch, tokens, heads, channels, generator=g, dtype=torch.float64)
    # Pixel coordinates i + f with f in [0.15, 0.85]: away from the lines where bilinear interpolation has kinks.
    loc = torch.empty(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64)
    for lvl, (h, w) in enumerate(shapes):
        for axis, size in enumerate((w, h)):
            whole = torch.randint(-1, size + 1, loc[:, :, :, lvl, :, axis].shape, generator=g)
            frac = 0.15 + 0.7 * torch.rand(whole.shape, generator=g, dtype=torch.float64)
            loc[:, :, :, lvl, :, axis] = (whole + frac + 0.5) / size
    attn = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=torch.float64)
    inputs = (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_())

    def fn(v, sampling_locations, attention_weights):
        return ms_deform_attn(v, spatial, start, sampling_locations, attention_weights, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def _tiny_inputs():
    spatial, start = _shapes([(2, 2)])
    return (torch.randn(1, 4, 1, 2), spatial, start, torch.rand(1, 3, 1, 1, 2, 2), torch.rand(1, 3, 1, 1, 2))


@pytest.fixture
def registry(monkeypatch):
    """A private registry holding only the torch backend; the module's own is restored after the test."""
    monkeypatch.setattr(da, "_BACKENDS", {"torch": da._BACKENDS["torch"]})
    monkeypatch.delenv(da.ENV_VAR, raising=False)
    return monkeypatch


def _spy(calls: list[str], name: str):
    def fn(*args):
        calls.append(name)
        return da.ms_deform_attn_pytorch(*args)

    return fn


@pytest.mark.parametrize("env", [None, "auto", "torch", "TORCH"])
def test_dispatch_picks_torch(registry, env):
    calls: list[str] = []
    register_backend("torch", _spy(calls, "torch"), lambda value: True)
    if env is not None:
        registry.setenv(da.ENV_VAR, env)
    inputs = _tiny_inputs()
    torch.testing.assert_close(ms_deform_attn(*inputs), da.ms_deform_attn_pytorch(*inputs))
    assert calls == ["torch"]
    assert available_backends() == ["torch"]


def test_forcing_unregistered_backend_raises(registry):
    with pytest.raises(ValueError, match=r"'triton'.*not registered.*\['torch'\]"):
        ms_deform_attn(*_tiny_inputs(), backend="triton")
    registry.setenv(da.ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"'triton'.*OPENSEED_DEFORM_ATTN.*not registered.*\['torch'\]"):
        ms_deform_attn(*_tiny_inputs())
    registry.setenv(da.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="OPENSEED_DEFORM_ATTN"):
        ms_deform_attn(*_tiny_inputs())


def test_auto_prefers_available_triton(registry):
    calls: list[str] = []
    register_backend("triton", _spy(calls, "triton"), lambda value: True)
    ms_deform_attn(*_tiny_inputs())
    assert calls == ["triton"]
    registry.setenv(da.ENV_VAR, "torch")
    ms_deform_attn(*_tiny_inputs())
    assert calls == ["triton"]


def test_auto_skips_unavailable_triton(registry):
    calls: list[str] = []
    register_backend("triton", _spy(calls, "triton"), lambda value: value.is_cuda)
    inputs = _tiny_inputs()
    ms_deform_attn(*inputs)
    assert calls == []
    assert available_backends() == ["torch", "triton"]
    assert available_backends(inputs[0]) == ["torch"]
    with pytest.raises(RuntimeError, match=r"'triton'.*not available.*\['torch'\]"):
        ms_deform_attn(*inputs, backend="triton")


def test_auto_is_reserved(registry):
    with pytest.raises(ValueError, match="reserved"):
        register_backend("auto", da.ms_deform_attn_pytorch, lambda value: True)


def _mutate(index, new):
    def apply(inputs):
        inputs = list(inputs)
        inputs[index] = new(inputs[index])
        return inputs

    return apply


@pytest.mark.parametrize(
    "mutate, name",
    [
        (_mutate(0, lambda v: v[:, :3]), "value"),
        (_mutate(0, lambda v: v[0]), "value"),
        (_mutate(0, lambda v: v.long()), "value"),
        (_mutate(1, lambda s: s[:, :1]), "spatial_shapes"),
        (_mutate(2, lambda i: i[:0]), "level_start_index"),
        (_mutate(2, lambda i: i + 1), "level_start_index"),
        (_mutate(3, lambda loc: loc[..., :1]), "sampling_locations"),
        (_mutate(3, lambda loc: loc.expand(2, -1, -1, -1, -1, -1)), "sampling_locations"),
        (_mutate(4, lambda a: a[..., :1]), "attention_weights"),
    ],
)
def test_shape_errors_name_the_tensor(mutate, name):
    with pytest.raises(ValueError, match=name):
        ms_deform_attn(*mutate(_tiny_inputs()))


def _module_inputs(generator, module, batch=2, queries=5):
    spatial, start = _shapes(SHAPES)
    tokens = int(spatial.prod(1).sum())
    query = torch.randn(batch, queries, module.d_model, generator=generator)
    value = torch.randn(batch, tokens, module.d_model, generator=generator)
    ref = torch.rand(batch, queries, module.n_levels, 2, generator=generator)
    return query, ref, value, spatial, start


def _randomised_module(generator, **kwargs):
    """A module whose offsets/weights depend on the query (the standard init zeroes those weights)."""
    module = MSDeformAttn(**kwargs)
    with torch.no_grad():
        module.sampling_offsets.weight.copy_(torch.randn(module.sampling_offsets.weight.shape, generator=generator))
        module.attention_weights.weight.copy_(torch.randn(module.attention_weights.weight.shape, generator=generator))
    return module


def test_module_shapes_and_float32():
    g = torch.Generator().manual_seed(2)
    module = _randomised_module(g, d_model=16, n_levels=3, n_heads=4, n_points=2)
    query, ref, value, spatial, start = _module_inputs(g, module)
    out = module(query, ref, value, spatial, start)
    assert out.shape == query.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_module_rejects_bad_config_and_reference():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
    g = torch.Generator().manual_seed(3)
    module = MSDeformAttn(d_model=8, n_levels=3, n_heads=2, n_points=2)
    query, ref, value, spatial, start = _module_inputs(g, module)
    for bad in (torch.rand(2, 5, 3, 3), torch.rand(2, 5, 2, 2), torch.rand(2, 5, 6)):
        with pytest.raises(ValueError, match="reference_points"):
            module(query, bad, value, spatial, start)


def test_padding_tokens_have_no_influence():
    g = torch.Generator().manual_seed(4)
    module = _randomised_module(g, d_model=16, n_levels=3, n_heads=4, n_points=2)
    query, ref, value, spatial, start = _module_inputs(g, module)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[0, 10:15] = True  # second row of level 0 and below
    mask[1, -7:] = True
    changed = value.clone()
    changed[mask] = torch.randn(int(mask.sum()), value.shape[-1], generator=g) * 100
    out = module(query, ref, value, spatial, start, padding_mask=mask)
    assert torch.equal(out, module(query, ref, changed, spatial, start, padding_mask=mask))
    assert not torch.allclose(out, module(query, ref, value, spatial, start))


def test_box_reference_matches_equivalent_point_reference():
    """A box of size 2P / (w_l, h_l) spreads the offsets exactly like the pixel offsets of a point reference."""
    g = torch.Generator().manual_seed(5)
    module = _randomised_module(g, d_model=12, n_levels=3, n_heads=3, n_points=2)
    query, ref, value, spatial, start = _module_inputs(g, module)
    box_wh = 2 * module.n_points / spatial.flip(-1).float()
    boxes = torch.cat([ref, box_wh.expand_as(ref)], -1)
    out_points = module(query, ref, value, spatial, start)
    out_boxes = module(query, boxes, value, spatial, start)
    assert out_boxes.shape == query.shape
    torch.testing.assert_close(out_boxes, out_points, rtol=1e-5, atol=1e-6)
    smaller = torch.cat([ref, box_wh.expand_as(ref) * 0.5], -1)
    assert not torch.allclose(module(query, smaller, value, spatial, start), out_points)


def test_initial_sampling_offsets_follow_head_directions():
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=3)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    assert torch.count_nonzero(module.value_proj.bias) == 0 and torch.count_nonzero(module.output_proj.bias) == 0
    bias = module.sampling_offsets.bias.view(8, 2, 3, 2)
    # head h points along angle 2*pi*h/8, normalised so the larger of |cos|, |sin| is 1
    directions = torch.tensor([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]).float()
    for p in range(3):
        for lvl in range(2):
            torch.testing.assert_close(bias[:, lvl, p], directions * (p + 1), rtol=0, atol=1e-5)


def test_backward_reaches_all_parameters():
    g = torch.Generator().manual_seed(6)
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    query, ref, value, spatial, start = _module_inputs(g, module)
    module(query, ref, value, spatial, start).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
