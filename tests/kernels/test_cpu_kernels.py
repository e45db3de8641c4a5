"""lmforge's compiled CPU kernels (lmforge/kernels/cpu/kernels.c) against the plain-torch backend ops they replace:
paged attention (decode, prefill, mixed batches, GQA, sliding windows, a narrower value head; float32 and float16
caches, the latter's fill rounding as torch does and its output within float16 rounding of float32's), RMSNorm with and
without a residual, rotary (full and partial, on strided q/k views) and its cos/sin, the token embedding and
SiLU-and-mul. The int4 linear is tested
against the dequantized float32 weight in tests/weights/test_gguf_pack.py and tests/quant/test_cpu_ops.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.backends.cpu import attention, norm, rotary
from lmforge.backends.cpu.activation import silu_and_mul
from lmforge.kernels import cpu as cpu_kernels
from lmforge.model_inputs import AttnOptions

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _kernels_built():
    if not cpu_kernels.available():
        pytest.fail("the CPU kernels did not build on this machine (a C compiler is part of the test setup)")


@contextlib.contextmanager
def torch_only():
    """The backends' plain-torch path, as on a machine without a C compiler."""
    saved = cpu_kernels._lib, cpu_kernels._tried
    cpu_kernels._lib, cpu_kernels._tried = None, True
    try:
        yield
    finally:
        cpu_kernels._lib, cpu_kernels._tried = saved


@pytest.mark.parametrize(
    "q_lens, kv_lens",
    [
        ([1], [1]),  # a first token
        ([1, 1, 1], [37, 5, 130]),  # decode
        ([9], [9]),  # prefill
        ([5, 1, 1, 12], [20, 64, 3, 12]),  # mixed: a chunked prefill, decodes and a fresh prompt
    ],
)
# head_dim 64 takes the AVX-512 register path (query heads 4 at a time: groups of 3 and of 5)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 32), (9, 3, 64), (10, 2, 64), (8, 2, 128)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_paged_attention_kernel_equals_the_torch_path(
    q_lens, kv_lens, heads, kv_heads, head_dim, window, cache_dtype, paged_batch
):
    """A float16 cache too: both paths widen the very same stored values to float32 exactly, so the outputs differ
    by float32 summation order only, as over a float32 cache."""
    g = torch.Generator().manual_seed(sum(kv_lens) * heads + head_dim)
    batch = paged_batch(q_lens, kv_lens, heads, kv_heads, head_dim, 4, torch.float32, torch.device("cpu"), generator=g)
    options = AttnOptions(scale=head_dim**-0.5, sliding_window=window)
    k_cache, v_cache = batch["k_cache"].to(cache_dtype), batch["v_cache"].to(cache_dtype)
    args = (batch["query"], k_cache, v_cache, batch["meta"], options)
    assert cpu_kernels.paged_attention(batch["query"], k_cache, v_cache, batch["meta"], 1.0, window, None) is not None
    batch["meta"].scratch.clear()
    out = attention.paged_attention(*args)
    batch["meta"].scratch.clear()
    with torch_only():
        expected = attention.paged_attention(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lens, kv_lens", [([1, 1, 1], [37, 5, 130]), ([5, 1, 12], [20, 64, 12])])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128)])
def test_paged_attention_kernel_over_a_float16_cache_is_within_its_rounding(
    q_lens, kv_lens, heads, kv_heads, head_dim, paged_batch
):
    """The float16 cache against the float32 one it rounds: each stored value moves by at most 2^-11 of itself
    (round to nearest, 10 mantissa bits), so a score q.k * scale by at most e_s = 2^-11 * scale * sum |q| |k|, and the
    output sum_j p_j v_j by at most 2^-11 max|v| (the values) + 2 max(e_s) max|v| (the softmax weights: dp_j = p_j
    (ds_j - sum_i p_i ds_i)). The bound is computed from the batch itself, plus 1e-5 for float32 arithmetic."""
    g = torch.Generator().manual_seed(len(q_lens) * head_dim)
    batch = paged_batch(q_lens, kv_lens, heads, kv_heads, head_dim, 8, torch.float32, torch.device("cpu"), generator=g)
    query, k_cache, v_cache, meta = batch["query"], batch["k_cache"], batch["v_cache"], batch["meta"]
    scale = head_dim**-0.5
    options = AttnOptions(scale=scale)
    with torch_only():
        exact = attention.paged_attention(query, k_cache, v_cache, meta, options)
    meta.scratch.clear()
    out = attention.paged_attention(query, k_cache.half(), v_cache.half(), meta, options)
    u = 2.0**-11
    group = heads // kv_heads
    # sum_d |q_d| |k_d| for every query head and every cache row of its kv head (stale rows too: a looser bound)
    q_abs = query.abs().view(-1, kv_heads, group, head_dim)
    k_abs = k_cache.abs().flatten(0, 1)  # [slots, kv_heads, dim]
    score_err = u * scale * torch.einsum("thgd,shd->thgs", q_abs, k_abs).amax()
    v_max = v_cache.abs().amax()
    bound = float(u * v_max + 2 * score_err * v_max) + 1e-5
    err = float((out - exact).abs().max())
    assert 0 < err <= bound, (err, bound)


def test_the_float16_cache_fill_rounds_as_torch_does(paged_batch):
    """The kernel's write of this step's keys and values into a float16 cache gives torch's bytes exactly: round to
    nearest even at ties (values halfway between two float16s), float16 subnormals, and values past the float16
    range clamped to +-65504. head_dim 20: a value row is 16 values for the vector conversion and 4 for the scalar
    one (the plain-C build: all scalar)."""
    g = torch.Generator().manual_seed(7)
    q_lens, kv_lens, kv_heads, head_dim = [3, 1], [3, 9], 2, 20
    batch = paged_batch(q_lens, kv_lens, 4, kv_heads, head_dim, 4, torch.float32, torch.device("cpu"), generator=g)
    t = sum(q_lens)
    # magnitudes 2^-26 .. 2^12: float16 subnormals (below 2^-14), the boundary and normal values
    magnitude = 2.0 ** torch.randint(-26, 13, (2, t, kv_heads, head_dim), generator=g)
    half = (torch.randn(2, t, kv_heads, head_dim, generator=g) * magnitude).half()
    up = torch.nextafter(half, torch.tensor(float("inf"), dtype=torch.float16))
    ties = (half.float() + up.float()) / 2  # exactly halfway: float32 holds it, float16 must round it to even
    key, value = ties[0], ties[1]
    key[0, 0, :4] = torch.tensor([7e4, -1e9, 65519.0, 65520.0])  # clamped to +-65504, not inf
    value[-1, 1, -3:] = torch.tensor([3e-8, -2.9e-8, 0.0])  # about half the smallest subnormal (2^-25): 2^-24, -0
    caches = batch["k_cache"].half(), batch["v_cache"].half()
    expected = tuple(c.clone() for c in caches)
    assert cpu_kernels.paged_attention(batch["query"], *caches, batch["meta"], 0.3, None, None, key, value) is not None
    with torch_only():
        attention.fill_kv_cache(key, value, *expected, batch["meta"].slot_mapping)
    for got, want in zip(caches, expected, strict=True):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert float(caches[0].abs().max()) == 65504.0


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_paged_attention_kernel_with_a_narrower_value_head(paged_batch, shared, cache_dtype):
    """Keys of 96 dims, values of 64 (v_head_dim): a value cache of its own, or MLA's one latent cache for both."""
    g = torch.Generator().manual_seed(3)
    batch = paged_batch([3, 1], [10, 21], 4, 1, 96, 8, torch.float32, torch.device("cpu"), v_head_dim=64, generator=g)
    options = AttnOptions(scale=0.1, v_head_dim=64)
    k_cache = batch["k_cache"].to(cache_dtype)
    v_cache = k_cache if shared else batch["v_cache"].to(cache_dtype)
    args = (batch["query"], k_cache, v_cache, batch["meta"], options)
    out = attention.paged_attention(*args)
    assert out.shape == (4, 4, 64)
    batch["meta"].scratch.clear()
    with torch_only():
        expected = attention.paged_attention(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_what_the_attention_kernel_does_not_take_falls_back(paged_batch):
    """softcapping and a bf16 cache run the torch path (the wrapper answers None, the backend goes on)."""
    batch = paged_batch([1, 1], [5, 9], 4, 2, 32, 4, torch.float32, torch.device("cpu"))
    meta = batch["meta"]
    assert cpu_kernels.paged_attention(batch["query"], batch["k_cache"].bfloat16(), batch["v_cache"], meta, 1.0,
                                       None, None) is None  # fmt: skip
    capped = AttnOptions(scale=0.2, logit_softcapping=30.0)
    args = (batch["query"], batch["k_cache"], batch["v_cache"], meta, capped)
    out = attention.paged_attention(*args)
    with torch_only():
        torch.testing.assert_close(out, attention.paged_attention(*args))


@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_kernel_equals_the_torch_path(rows, with_residual, offset):
    g = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 200, generator=g)
    x = wide[:, 8:104]  # strided rows, as a slice of a wider activation
    residual = torch.randn(rows, 96, generator=g) if with_residual else None
    weight = torch.randn(96, generator=g)
    out = norm.rms_norm(x, weight, 1e-6, residual, offset)
    with torch_only():
        expected = norm.rms_norm(x, weight, 1e-6, residual, offset)
    if with_residual:
        torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], expected[1], rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rot", [64, 32])  # full and partial rotary
@pytest.mark.parametrize("tokens", [1, 17])
def test_rotary_kernel_equals_the_torch_path(rot, tokens):
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (6 + 2 + 2) * 64, generator=g)
    q, k, _ = qkv.split([6 * 64, 2 * 64, 2 * 64], dim=-1)
    q, k = q.unflatten(-1, (6, 64)), k.unflatten(-1, (2, 64))  # strided views of the fused projection
    cos, sin = rotary.rotary_cos_sin(torch.arange(3, 3 + tokens), 1.0 / (10000 ** (torch.arange(0, rot, 2) / rot)))
    out = rotary.apply_rotary(q, k, cos, sin)
    with torch_only():
        expected = rotary.apply_rotary(q, k, cos, sin)
    for a, b in zip(out, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("position_scale, attention_scaling", [(1.0, 1.0), (4.0, 0.7)])
def test_cos_sin_kernel_equals_the_torch_path(position_scale, attention_scaling):
    positions = torch.tensor([0, 1, 5, 17, 1000, 4095])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 48, 2) / 48))
    got = rotary.rotary_cos_sin(positions, inv_freq, position_scale, attention_scaling)
    with torch_only():
        expected = rotary.rotary_cos_sin(positions, inv_freq, position_scale, attention_scaling)
    for a, b in zip(got, expected, strict=True):  # libm's cosf/sinf against torch's vectorized ones: an ulp or so
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_embedding_kernel_gathers_exactly_the_rows():
    from lmforge.backends.cpu import embedding

    weight = torch.randn(50, 7 * 16)[:, :96]  # rows strided: a view of a wider table
    ids = torch.tensor([[3, 0, 49], [3, 3, 11]])
    out = embedding(ids, weight)
    assert cpu_kernels.embedding(ids, weight) is not None
    assert torch.equal(out, torch.nn.functional.embedding(ids, weight))
    assert cpu_kernels.embedding(ids.int(), weight) is None  # int64 ids only: torch's path for the rest


@pytest.mark.parametrize("rows", [1, 40])
def test_silu_and_mul_kernel_equals_the_torch_path(rows):
    x = torch.randn(rows, 2 * 300)[:, :512]  # strided rows
    out = silu_and_mul(x)
    with torch_only():
        expected = silu_and_mul(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_the_library_is_cached_and_can_be_switched_off(tmp_path):
    """A second process loads the cached library instead of compiling; LMFORGE_CPU_KERNELS=0 turns it off."""
    code = "from lmforge.kernels import cpu; lib = cpu.library(); print(lib is not None and lib._name)"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    built = first.stdout.strip()
    assert built.startswith(str(tmp_path)) and os.path.exists(built)
    mtime = os.path.getmtime(built)
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert again.stdout.strip() == built and os.path.getmtime(built) == mtime
    off = subprocess.run([sys.executable, "-c", code], env={**env, "LMFORGE_CPU_KERNELS": "0"}, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert off.stdout.strip() == "False"


@pytest.mark.parametrize(
    "isa, cflags",
    [
        ("avx2", "-mno-avx512f"),
        ("plain C", "-mno-avx512f -mno-avx2 -mno-fma"),
        ("avx512 without vnni", "-mno-avx512vnni"),
    ],
)
def test_the_other_instruction_set_variants_agree_too(isa, cflags, tmp_path):
    """The kernels built without AVX-512 (AVX2 + FMA) and without any vector extension pass the same tests, so a
    machine with fewer extensions than this one runs correct code."""
    env = {**os.environ, "LMFORGE_CPU_KERNELS_CFLAGS": cflags, "XDG_CACHE_HOME": str(tmp_path)}
    code = "from lmforge.kernels import cpu; print(cpu.library().lmf_simd_width())"
    width = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(width.stdout) == {"avx2": 8, "plain C": 1, "avx512 without vnni": 16}[isa]
    tests = ["tests/kernels/test_cpu_kernels.py", "tests/kernels/test_q4_int8.py", "tests/kernels/test_cpu_sampling.py",
             "tests/kernels/test_q4_cols.py", "tests/kernels/test_cpu_program.py", "tests/weights/test_gguf_pack.py",
             "-k", "not other_instruction and (kernel or packed_matmul or int8)"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO,
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]


@pytest.mark.parametrize("q_lens, kv_lens", [([1, 1], [9, 30]), ([6, 1], [6, 17])])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_fill_and_attend_in_one_call_equals_fill_kv_cache_then_attention(q_lens, kv_lens, cache_dtype, paged_batch):
    """The kernel writes this step's keys and values into their slots, then attends: the caches and the output
    equal the torch path's fill_kv_cache + paged_attention (a float16 cache: the same rounded bytes)."""
    g = torch.Generator().manual_seed(sum(kv_lens))
    batch = paged_batch(q_lens, kv_lens, 6, 2, 64, 4, torch.float32, torch.device("cpu"), generator=g)
    t = sum(q_lens)
    key, value = torch.randn(t, 2, 64, generator=g), torch.randn(t, 2, 64, generator=g)
    options = AttnOptions(scale=0.125)
    batch["k_cache"], batch["v_cache"] = batch["k_cache"].to(cache_dtype), batch["v_cache"].to(cache_dtype)
    caches = batch["k_cache"].clone(), batch["v_cache"].clone()
    probe = batch["k_cache"].clone(), batch["v_cache"].clone()
    assert cpu_kernels.paged_attention(batch["query"], *probe, batch["meta"], 0.125, None, None, key, value) is not None
    out = attention.fill_kv_and_attend(batch["query"], key, value, *caches, batch["meta"], options)
    batch["meta"].scratch.clear()
    expected_caches = batch["k_cache"].clone(), batch["v_cache"].clone()
    with torch_only():
        expected = attention.fill_kv_and_attend(batch["query"], key, value, *expected_caches, batch["meta"], options)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(caches, expected_caches, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13, 33])
@pytest.mark.parametrize("n", [37, 64])
@pytest.mark.parametrize("half", [False, True])  # scales and mins exact in float16 (as GGUF stores them) or not
def test_q4_linear_at_every_row_count_and_a_ragged_width(rows, n, half, monkeypatch):
    """The batch-1 kernel (4 weight rows at a time), the register path (<= 4 rows) and the tiled path (8 weight
    rows x 4 activation rows per tile) against the dequantized weight, with widths that leave partial tiles; with
    float32 scales and with the float16 ones q4_prepare keeps where they are exact. The int8-activation path that
    takes most multi-row calls is off here (tests/kernels/test_q4_int8.py tests it)."""
    from lmforge.nn.quant.packing import pack_int32

    monkeypatch.setattr(cpu_kernels, "Q8_MIN_ROWS", 1 << 30)

    g = torch.Generator().manual_seed(rows * n)
    k = 96
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=g)
    scales, mins = torch.rand(k // 32, n, generator=g) * 0.1, torch.randn(k // 32, n, generator=g) * 0.1
    if half:
        scales, mins = scales.half().float(), mins.half().float()
    prepared = cpu_kernels.q4_prepare(pack_int32(codes, 4, 0), scales, mins, 32, 1, zeros=False)
    assert prepared["q4_half"] == half and prepared["q4_scales"].dtype == (torch.float16 if half else torch.float32)
    if half:
        torch.testing.assert_close(cpu_kernels.q4_dequantize(prepared), (codes.float() * scales.repeat_interleave(
            32, 0) + mins.repeat_interleave(32, 0)).t(), rtol=0, atol=1e-6)  # fmt: skip
    groups = torch.arange(k) // 32
    weight = (codes.float() * scales[groups] + mins[groups]).t()  # [N, K]
    x, bias = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(cpu_kernels.q4_linear(x, prepared, bias), x @ weight.t() + bias, rtol=1e-5, atol=1e-5)
