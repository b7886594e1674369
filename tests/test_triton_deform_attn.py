"""Triton deformable attention kernels: interpreter and ahead-of-time checks without a GPU, dispatch, benchmark CLI,
and (marked ``gpu``) the compiled kernels on CUDA against the float64 PyTorch path.

The interpreter checks need ``TRITON_INTERPRET=1`` before triton is imported and the AOT checks need it unset, so
both run tests/_triton_checks.py in a fresh process (one process per mode, its JSON report is shared by the
parametrised tests below).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openseed.ops import available_backends, ms_deform_attn
from openseed.ops import benchmark as bench
from openseed.ops import deform_attn as da
from tests import _triton_checks as checks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(checks.__file__)
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


def _run_checks(mode: str, tmp_path: Path) -> dict:
    """Run tests/_triton_checks.py MODE in a fresh process and return its JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compiled kernels stay out of the user's cache
    if mode == "interp":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"{SCRIPT.name} {mode} gave no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    assert proc.returncode == (0 if all(r["ok"] for r in report.values()) else 1), proc.stderr
    return report


@pytest.fixture(scope="module")
def interp_report(tmp_path_factory) -> dict:
    return _run_checks("interp", tmp_path_factory.mktemp("interp"))


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory) -> dict:
    return _run_checks("aot", tmp_path_factory.mktemp("aot"))


# --- Triton interpreter (CPU) -----------------------------------------------------------------------------------


@needs_triton
def test_interpreter_report_is_complete(interp_report):
    assert sorted(interp_report) == sorted(checks.INTERP_CHECKS)


@needs_triton
@pytest.mark.parametrize("name", checks.INTERP_CHECKS)
def test_interpreter_kernel_matches_float64_reference(interp_report, name):
    """Forward and all three gradients under TRITON_INTERPRET=1 (see the check functions in _triton_checks.py)."""
    result = interp_report[name]
    assert result["ok"], f"{name} failed:\n{result['detail']}"


# --- ahead-of-time compilation for sm_80 / sm_90 (no GPU needed) -----------------------------------------------


@needs_triton
def test_aot_report_is_complete(aot_report):
    assert sorted(aot_report) == sorted(checks.AOT_CASES)


@needs_triton
@pytest.mark.parametrize("case", checks.AOT_CASES)
def test_aot_compiles_to_cubin(aot_report, case):
    """PTX for the target with the kernel's entry, an ELF cubin from triton's bundled ptxas, vector loads and
    (backward) fp32 atomics: see ``aot_case`` in _triton_checks.py."""
    result = aot_report[case]
    assert result["ok"], f"{case} failed:\n{result['detail']}"
    assert json.loads(result["detail"])["cubin_bytes"] > 1000


# --- import and dispatch (CPU) ---------------------------------------------------------------------------------


def _tiny_inputs():
    g = torch.Generator().manual_seed(0)
    return checks.make_inputs(g, 1, 3, 2, 4, [(2, 4), (1, 2)], 2)


def test_import_is_lazy_and_survives_missing_triton():
    code = "\n".join([
        "import sys",
        "import openseed.ops.deform_attn as da",
        "assert 'triton' not in sys.modules and 'openseed.ops.triton_deform_attn' not in sys.modules",
        "assert 'triton' in da.available_backends()",
        "sys.modules['triton'] = None  # from here on, `import triton` fails as if it were not installed",
        "import openseed.ops.triton_deform_attn as t",
        "assert not t.HAS_TRITON and da._triton_fn() is None",
        "import torch",
        "value = torch.zeros(1, 1, 1, 1)",
        "assert not da._triton_available(value)",
        "try:",
        "    da._ms_deform_attn_triton(value, None, None, None, None)",
        "except RuntimeError as err:",
        "    assert 'not installed' in str(err), err",
        "else:",
        "    raise AssertionError('no error')",
        "print('lazy-ok')",
    ])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "lazy-ok" in proc.stdout, proc.stderr


def test_triton_registered_but_not_available_on_cpu(monkeypatch):
    monkeypatch.delenv(da.ENV_VAR, raising=False)
    inputs = _tiny_inputs()
    assert "triton" in available_backends()
    assert available_backends(inputs[0]) == ["torch"]
    assert available_backends(inputs[0].double()) == ["torch"]


@pytest.mark.parametrize("env", [None, "auto"])
def test_cpu_dispatch_uses_torch(monkeypatch, env):
    calls = []

    def spy(*args):
        calls.append("torch")
        return da.ms_deform_attn_pytorch(*args)

    monkeypatch.setitem(da._BACKENDS, "torch", da._Backend(spy, lambda value: True))
    if env is None:
        monkeypatch.delenv(da.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(da.ENV_VAR, env)
    inputs = _tiny_inputs()
    out = ms_deform_attn(*inputs, backend=None)
    assert calls == ["torch"]
    torch.testing.assert_close(out, da.ms_deform_attn_pytorch(*inputs), rtol=0, atol=0)


def test_forcing_triton_on_cpu_raises(monkeypatch):
    monkeypatch.delenv(da.ENV_VAR, raising=False)
    inputs = _tiny_inputs()
    with pytest.raises(RuntimeError, match=r"'triton'.*backend argument.*not available.*cpu.*\['torch'\]"):
        ms_deform_attn(*inputs, backend="triton")
    monkeypatch.setenv(da.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match=r"'triton'.*OPENSEED_DEFORM_ATTN.*not available"):
        ms_deform_attn(*inputs)
    monkeypatch.setenv(da.ENV_VAR, "torch")
    assert ms_deform_attn(*inputs).shape == (1, 3, 8)


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
def test_kernel_entry_on_cpu_without_interpreter_raises():
    from openseed.ops.triton_deform_attn import ms_deform_attn_triton

    assert da._triton_fn() is ms_deform_attn_triton
    with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        ms_deform_attn_triton(*_tiny_inputs())


@needs_triton
@pytest.mark.parametrize("queries, channels, expected", [(21760, 32, (64, 32, 4)), (300, 32, (16, 32, 2)),
                                                         (900, 17, (32, 32, 2)), (5000, 256, (8, 256, 4))])  # fmt: skip
def test_gpu_launch_heuristic(monkeypatch, queries, channels, expected):
    """Tile of ~2048 elements, fewer queries per program while the grid would leave SMs idle (132 SMs, B*H = 16)."""
    from openseed.ops import triton_deform_attn as tda

    monkeypatch.setattr(tda, "_multiprocessor_count", lambda index: 132)
    fake_cuda_value = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    assert tda._launch_config(fake_cuda_value, queries, 16, channels) == expected
    block_q, block_c, _ = tda._launch_config(torch.zeros(1), queries, 16, channels)  # CPU: interpreter config
    assert (block_q, block_c) == (tda.INTERPRET_BLOCK_Q, expected[1])


# --- benchmark CLI ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_benchmark_without_cuda_prints_message_and_sanity(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert bench.main(["repeats=1", "warmup=0", f"out={out_json}"]) == 0
    printed = capsys.readouterr().out
    assert "CUDA is not available" in printed
    assert "| PyTorch fp32 vs fp64 |" in printed and "| ok |" in printed
    report = json.loads(out_json.read_text())
    assert report["cuda"] is False and report["cpu_sanity"]["max_abs_err"] < 1e-5


def test_benchmark_rejects_unknown_options(capsys):
    assert bench.main(["shapes=[encoder,huge]"]) == 2
    assert "shapes[1] must be one of ['encoder', 'decoder300', 'decoder900'], got 'huge'" in capsys.readouterr().err
    assert bench.main(["dtype=[fp8]"]) == 2
    assert "dtype[0] must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'" in capsys.readouterr().err
    assert bench.main(["repeats=0"]) == 2 and "repeats must be an integer >= 1" in capsys.readouterr().err
    assert bench.main(["--repeats", "2"]) == 2  # the old flags are refused, not half-read
    assert "'--repeats' is not a key=value word" in capsys.readouterr().err


def test_benchmark_peak_bandwidth_table():
    assert bench.peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert bench.peak_bandwidth_gbs("NVIDIA H100 PCIe") == 2000
    assert bench.peak_bandwidth_gbs("NVIDIA H200") == 4800
    assert bench.peak_bandwidth_gbs("NVIDIA A100-SXM4-80GB") == 2039
    assert bench.peak_bandwidth_gbs("NVIDIA A100-PCIE-40GB") == 1555
    assert bench.peak_bandwidth_gbs("NVIDIA GeForce RTX 4090") is None


def test_benchmark_shapes_and_bytes():
    inputs = bench.make_inputs(300, "cpu", levels=((4, 4), (2, 2)), batch=2, heads=2, channels=4, points=3)
    assert inputs["value"].shape == (2, 20, 2, 4) and inputs["loc"].shape == (2, 300, 2, 2, 3, 2)
    torch.testing.assert_close(inputs["attn"].sum((-1, -2)), torch.ones(2, 300, 2))
    # value 2*20*2*4 + output 2*300*2*4 elements in fp32 or bf16, locations and weights always fp32
    assert bench.forward_bytes(inputs, torch.float32) == (320 + 4800) * 4 + (14400 + 7200) * 4
    assert bench.forward_bytes(inputs, torch.bfloat16) == (320 + 4800) * 2 + (14400 + 7200) * 4
    assert sum(h * w for h, w in bench.LEVELS_1024) == 21760


def test_benchmark_rows_and_table_on_cpu(monkeypatch):
    """The measuring / reporting flow with CPU stand-ins for CUDA timing and memory (PyTorch rows only)."""
    full_size = bench.make_inputs

    def tiny_inputs(queries, device, seed=0):
        return full_size(queries, device, levels=((4, 4), (2, 2)), heads=2, channels=4, points=2, seed=seed)

    monkeypatch.setattr(bench, "make_inputs", tiny_inputs)
    monkeypatch.setattr(bench, "time_cuda_ms", lambda fn, warmup, repeats: 1.0)
    monkeypatch.setattr(bench, "peak_mib", lambda fn: (fn(), 0.5)[1])

    build_impls = bench.build_impls

    def pytorch_only(spatial, start, dtypes):
        impls, notes = build_impls(spatial, start, dtypes)
        return [i for i in impls if i.name == "PyTorch"], notes

    monkeypatch.setattr(bench, "build_impls", pytorch_only)
    rows, _ = bench.bench_shape("decoder300", ["fp32", "bf16"], 0, 1, 2000.0, 0, device="cpu")
    assert [(r["impl"], r["dtype"]) for r in rows] == [("PyTorch", "fp32"), ("PyTorch", "bf16")]
    assert rows[0]["max_abs_err"] == 0.0 and 0 < rows[1]["max_abs_err"] < 0.05
    assert rows[0]["fwd_pct_peak"] == pytest.approx(100 * rows[0]["fwd_gbs"] / 2000.0)
    table = bench.markdown_table(rows + [{"shape": "encoder", "queries": 1, "impl": "Triton", "dtype": "fp32",
                                          "error": "out of memory"}])  # fmt: skip
    assert table.count("\n") == 4 and "| decoder300 | 300 | PyTorch | bf16 | 1.000 |" in table
    assert "out of memory" in table


# --- CUDA (compiled kernels) -------------------------------------------------------------------------------------

LEVELS_256 = [(32, 32), (16, 16), (8, 8), (4, 4)]  # a 256 px image at strides 8, 16, 32, 64
TOLERANCES = {  # output, grad value, grad locations, grad weights (relative to max(1, max |reference|))
    torch.float32: (2e-5, (2e-5, 2e-5, 2e-5)),
    torch.bfloat16: (1e-2, (1e-2, 1e-4, 1e-4)),
    torch.float16: (2e-3, (2e-3, 1e-4, 1e-4)),
}


def _cuda(inputs):
    return tuple(t.cuda() for t in inputs)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("queries", [300, sum(h * w for h, w in LEVELS_256)], ids=["decoder300", "encoder"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gpu_kernel_matches_float64_reference(dtype, queries):
    from openseed.ops.triton_deform_attn import ms_deform_attn_triton

    g = torch.Generator().manual_seed(10)
    inputs = _cuda(checks.make_inputs(g, 2, queries, 8, 32, LEVELS_256, 4, dtype=dtype))
    rtol, grad_rtols = TOLERANCES[dtype]
    checks.compare_all(ms_deform_attn_triton, inputs, rtol=rtol, grad_rtols=grad_rtols)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("channels, heads", [(17, 3), (3, 1), (64, 2)])
def test_gpu_odd_channels_and_non_square_levels(channels, heads):
    from openseed.ops.triton_deform_attn import ms_deform_attn_triton

    g = torch.Generator().manual_seed(channels)
    inputs = _cuda(checks.make_inputs(g, 2, 77, heads, channels, [(5, 7), (3, 1), (1, 9), (2, 2)], 3))
    checks.compare_all(ms_deform_attn_triton, inputs, rtol=2e-5)


@pytest.mark.gpu
@requires_gpu
def test_gpu_gradcheck_float64():
    from openseed.ops.triton_deform_attn import ms_deform_attn_triton

    g = torch.Generator().manual_seed(11)
    value, spatial, start, loc, attn = _cuda(checks.kink_free_inputs(g, [(3, 4), (2, 2)], batch=2, queries=3))

    def fn(v, sampling_locations, attention_weights):
        return ms_deform_attn_triton(v, spatial, start, sampling_locations, attention_weights)

    assert torch.autograd.gradcheck(fn, (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()),
                                    eps=1e-6, atol=1e-8)  # fmt: skip


@pytest.mark.gpu
@requires_gpu
def test_gpu_auto_dispatch_picks_triton_for_cuda(monkeypatch):
    monkeypatch.delenv(da.ENV_VAR, raising=False)
    g = torch.Generator().manual_seed(12)
    inputs = _cuda(checks.make_inputs(g, 1, 20, 2, 8, [(4, 4), (2, 2)], 2))
    assert available_backends(inputs[0]) == ["torch", "triton"]
    assert available_backends(inputs[0].double()) == ["torch"]
    calls = []
    triton_backend = da._BACKENDS["triton"]

    def spy(*args):
        calls.append("triton")
        return triton_backend.fn(*args)

    monkeypatch.setitem(da._BACKENDS, "triton", da._Backend(spy, triton_backend.available))
    out = ms_deform_attn(*inputs)
    assert calls == ["triton"]
    torch.testing.assert_close(out, da.ms_deform_attn_pytorch(*inputs), rtol=1e-5, atol=1e-5)
    ms_deform_attn(inputs[0].double(), *inputs[1:])  # fp64 goes to torch
    assert calls == ["triton"]
    monkeypatch.setenv(da.ENV_VAR, "torch")
    ms_deform_attn(*inputs)
    assert calls == ["triton"]


@pytest.mark.gpu
@requires_gpu
def test_gpu_module_matches_between_backends(monkeypatch):
    g = torch.Generator().manual_seed(13)
    module = da.MSDeformAttn(d_model=64, n_levels=4, n_heads=4, n_points=4).cuda()
    spatial, start = checks.level_tables(LEVELS_256, device="cuda")
    tokens = sum(h * w for h, w in LEVELS_256)
    query = torch.randn(2, 50, 64, generator=g).cuda()
    value = torch.randn(2, tokens, 64, generator=g).cuda()
    ref = torch.rand(2, 50, 4, 2, generator=g).cuda()
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(da.ENV_VAR, backend)
        module.zero_grad()
        out = module(query, ref, value, spatial, start)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.gpu
@requires_gpu
def test_gpu_benchmark_runs(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert bench.main(["repeats=2", "warmup=1", "shapes=[decoder300]", f"out={out_json}"]) == 0
    printed = capsys.readouterr().out
    assert "| decoder300 | 300 | Triton | fp32 |" in printed and "| decoder300 | 300 | PyTorch | bf16 |" in printed
    rows = json.loads(out_json.read_text())["rows"]
    triton_fp32 = next(r for r in rows if r["impl"] == "Triton" and r["dtype"] == "fp32")
    assert triton_fp32["max_abs_err"] < 1e-4 and triton_fp32["fwd_ms"] > 0


@needs_triton
def test_kernel_entry_rejects_inputs_beyond_its_limits():
    from openseed.ops.triton_deform_attn import ms_deform_attn_triton

    _, spatial, start, loc, attn = _tiny_inputs()
    too_many_heads = torch.empty(2, 10, 40000, 1, device="meta")
    with pytest.raises(ValueError, match="65535"):
        ms_deform_attn_triton(too_many_heads, spatial, start, loc, attn)
    too_many_elements = torch.empty(1, 2**20, 8, 256, device="meta")
    with pytest.raises(ValueError, match="int32"):
        ms_deform_attn_triton(too_many_elements, spatial, start, loc, attn)
