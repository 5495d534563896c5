"""The Triton block-sparse kernel: its plan, the kernel itself, and the op's choice of CUDA kernel.

The kernel runs here in Triton's interpreter on CPU tensors. TRITON_INTERPRET must be set before
triton is imported, and importing t4dopt imports triton, so the ``test_interpreted_*`` cases run
in a pytest subprocess started with it set (`test_kernel_in_the_triton_interpreter`); in the
outer session they are skipped. The ``gpu`` tests run the compiled kernel on CUDA.
"""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from reference import dense_masked_attention, random_qkv  # noqa: E402
from t4dopt import masks  # noqa: E402
from t4dopt.ops import block_sparse, block_sparse_attention, tables, triton_kernel  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the subprocess of "
                                 "test_kernel_in_the_triton_interpreter, under TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _widen_bfloat16_dot_operands() -> None:
    """Work around Triton's interpreter multiplying bfloat16 ``tl.dot`` operands as their raw
    uint16 bits (it stores bfloat16 as uint16): widen them to float32 first, which is exact."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


if INTERPRETED:
    _widen_bfloat16_dot_operands()


def _inputs(layout, **shape):
    return random_qkv(layout, **{"heads": 2, **shape})


def _plan(layout, block_m=None, block_n=None, device="cpu"):
    default_m, default_n = triton_kernel.tile_sizes(int(layout.block_lengths.max()))
    return triton_kernel.build_plan(layout.to_dense(), layout.block_starts, block_m=block_m or default_m,
                                    block_n=block_n or default_n, device=device)


def _reference_lse(q, k, layout, scale, key_bias=None):
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if key_bias is not None:
        scores = scores + key_bias.double()[:, None, None, :]
    return torch.logsumexp(scores.masked_fill(~layout.token_mask().to(q.device), -math.inf), dim=-1)


def _check(layout, q, k, v, *, scale=None, block_m=None, block_n=None, key_bias=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = triton_kernel.forward(q, k, v, _plan(layout, block_m, block_n, q.device), scale, key_bias=key_bias)
    expected = dense_masked_attention(q, k, v, layout.token_mask(), scale, key_mask=key_bias)
    assert out.dtype == q.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[q.dtype], rtol=0)
    torch.testing.assert_close(lse.double(), _reference_lse(q, k, layout, scale, key_bias), atol=TOLERANCE[q.dtype],
                               rtol=0)
    return out, lse


def _key_bias(layout, batch, form="additive", seed=1):
    """float32 [batch, N]: -inf on about a third of the keys; 0 (additive) or random values (bias) elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, layout.seq_len, generator=generator) > 0.3
    values = torch.randn(batch, layout.seq_len, generator=generator) if form == "bias" else torch.zeros(keep.shape)
    return values.masked_fill(~keep, -math.inf)


# ------------------------------------------------------------------------------------------ plan

def _plan_token_mask(plan):
    """bool [N, N] of the token pairs a plan computes; asserts that no pair is computed twice."""
    mask = torch.zeros(plan.seq_len, plan.seq_len, dtype=torch.int32)
    full, starts, ends = (x.tolist() for x in (plan.full_starts, plan.partial_starts, plan.partial_ends))
    for q_start, q_end, full_begin, full_end, partial_begin, partial_end in plan.tiles.tolist():
        for c in range(full_begin, full_end):
            mask[q_start:q_end, full[c]:full[c] + plan.block_n] += 1
        for c in range(partial_begin, partial_end):
            assert 0 < ends[c] - starts[c] < plan.block_n
            mask[q_start:q_end, starts[c]:ends[c]] += 1
    assert int(mask.max()) <= 1
    return mask.bool()


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
@pytest.mark.parametrize("block_m, block_n", [(None, None), (16, 64), (64, 16)])
@pytest.mark.parametrize("suffix", [0, 45])
def test_plan_computes_exactly_the_kept_pairs(policy, block_m, block_n, suffix):
    # Blocks of 32: every frame ends in a partial block of 8, the prefix is a block of 21, the
    # suffix (text after the video) a block of 32 and one of 13.
    layout = masks.build(policy, 4, 72, prefix_tokens=21, suffix_tokens=suffix, block_size=32)
    plan = _plan(layout, block_m, block_n)
    assert torch.equal(_plan_token_mask(plan), layout.token_mask())
    lengths = plan.tiles[:, 1] - plan.tiles[:, 0]
    assert int(lengths.min()) > 0 and int(lengths.max()) <= plan.block_m
    assert int(lengths.sum()) == layout.seq_len


def test_plan_launches_the_longest_rows_first():
    layout = masks.sculpt4d(8, 256, block_size=32, prefix_tokens=40)
    plan = _plan(layout)
    work = (plan.tiles[:, 3] - plan.tiles[:, 2] + plan.tiles[:, 5] - plan.tiles[:, 4]).tolist()
    assert work == sorted(work, reverse=True) and work[0] > work[-1]


def test_plan_merges_consecutive_blocks_into_full_chunks():
    # Blocks of 16 under key tiles of 64: the anchor frame and the neighbour frames are runs of
    # whole frames, so most kept blocks share a chunk with their neighbours.
    layout = masks.sculpt4d(6, 128, block_size=16, prefix_tokens=8)
    plan = _plan(layout, block_n=64)
    kept_blocks = int(layout.kv_counts.sum())
    assert plan.chunks < kept_blocks / 2


def test_tile_sizes():
    assert triton_kernel.tile_sizes(128) == (128, 64)
    assert triton_kernel.tile_sizes(256) == (128, 64)
    assert triton_kernel.tile_sizes(40) == (64, 64)
    assert triton_kernel.tile_sizes(16) == (16, 16)
    assert triton_kernel.tile_sizes(5) == (16, 16)


def test_plan_build_is_fast_at_32_frames():
    """The plan of a 131k-token table is a few vectorized passes: milliseconds, not a Python loop."""
    layout = masks.sculpt4d(32, 4096, block_size=128)
    dense = layout.to_dense()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        plan = triton_kernel.build_plan(dense, layout.block_starts, block_m=128, block_n=64)
        times.append(time.perf_counter() - start)
    assert plan.num_tiles == layout.num_blocks
    assert min(times) < 0.1, f"{min(times) * 1e3:.0f} ms"


def test_the_op_caches_the_plan_per_table():
    layout = masks.sculpt4d(2, 40, block_size=16)
    table = tables.table_for(torch.empty(1, 1, layout.seq_len, 16), *layout.tensors())
    device = torch.device("cpu")
    assert table.triton_plan(device) is table.triton_plan(device)
    assert table.triton_plan(device, block_m=32).block_m == 32


@pytest.mark.skipif(INTERPRETED, reason="compiles for a GPU target, outside the interpreter")
def test_kernel_with_and_without_a_key_bias_compiles_for_hopper_without_a_gpu():
    """The compiled (not interpreted) kernel in both forms: a type error in HAS_BIAS code shows here."""
    import triton
    from triton.backends.compiler import GPUTarget

    pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "KeyBias": "*fp32",
                **{name: "*i32" for name in ("tiles", "full_starts", "partial_starts", "partial_ends")}}
    constants = ("HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N", "PRECISION", "HAS_BIAS")
    signature = {name: pointers.get(name, "constexpr" if name in constants else "fp32" if name == "qk_scale" else "i32")
                 for name in triton_kernel._forward_kernel.arg_names}
    sizes = []
    for has_bias in (False, True):
        source = triton.compiler.ASTSource(triton_kernel._forward_kernel, signature, constexprs=dict(
            HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_M=128, BLOCK_N=64, PRECISION="tf32", HAS_BIAS=has_bias))
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
        sizes.append(len(compiled.asm["ptx"]))
        assert ".target sm_90" in compiled.asm["ptx"]
    assert sizes[1] > sizes[0]   # the bias loads and the guarded softmax are compiled in only with HAS_BIAS


# --------------------------------------------------------------------------------- kernel choice

def test_supports_says_why_not():
    x = torch.empty(1, 2, 64, 64)
    if not INTERPRETED:
        assert "cpu tensors" in triton_kernel.supports(x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        assert triton_kernel.supports(x) is None
        assert "dtype torch.float64" in triton_kernel.supports(x.double())
        assert "q/k head dim 48" in triton_kernel.supports(torch.empty(1, 2, 64, 48))
        assert "q/k head dim 256" in triton_kernel.supports(torch.empty(1, 2, 64, 256))
        assert "v head dim 24" in triton_kernel.supports(x, torch.empty(1, 2, 64, 24))
        assert "scale" in triton_kernel.supports(x, scale=-0.5)


def test_cuda_kernel_choice_follows_the_environment(monkeypatch):
    q = torch.empty(1, 2, 64, 64, dtype=torch.bfloat16)
    monkeypatch.setenv(block_sparse.CUDA_KERNEL_ENV, "flex")
    assert block_sparse.cuda_forward_kernel(q, q, 0.1) == "flex"
    monkeypatch.setenv(block_sparse.CUDA_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="expected auto, flex or triton"):
        block_sparse.cuda_forward_kernel(q, q, 0.1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (only to pass supports() with CPU tensors)
    monkeypatch.setenv(block_sparse.CUDA_KERNEL_ENV, "auto")
    assert block_sparse.cuda_forward_kernel(q, q, 0.1) == "triton"
    assert block_sparse.cuda_forward_kernel(q.float(), q.float(), 0.1) == "flex"
    assert block_sparse.cuda_forward_kernel(q[..., :48], q[..., :48], 0.1) == "flex"
    monkeypatch.setenv(block_sparse.CUDA_KERNEL_ENV, "triton")
    assert block_sparse.cuda_forward_kernel(q.float(), q.float(), 0.1) == "triton"
    with pytest.raises(ValueError, match="head dim 48"):
        block_sparse.cuda_forward_kernel(q[..., :48], q[..., :48], 0.1)


# ------------------------------------------------------------------------ kernel, in the interpreter

@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session")
def test_kernel_in_the_triton_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-k", "interpreted",
         "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


@interpreted
@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
def test_interpreted_every_policy(policy):
    # 40 tokens per frame with blocks of 16: every frame ends in a partial block of 8;
    # 7 prefix tokens form a block of their own, 21 suffix tokens a block of 16 and one of 5.
    layout = masks.build(policy, 3, 40, prefix_tokens=7, suffix_tokens=21, block_size=16)
    _check(layout, *_inputs(layout))


@interpreted
@pytest.mark.parametrize("form, block_m, block_n", [("bias", None, None), ("additive", 16, 32), ("bias", 32, 16)])
def test_interpreted_key_bias(form, block_m, block_n):
    # Blocks of 64 with a suffix: full and partial chunks, several tiles per block, all with the bias.
    layout = masks.sculpt4d(3, 100, block_size=64, prefix_tokens=20, suffix_tokens=30)
    q, k, v = _inputs(layout, batch=2, head_dim=16)
    _check(layout, q, k, v, block_m=block_m, block_n=block_n, key_bias=_key_bias(layout, 2, form))


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_interpreted_key_bias_half_precision(dtype):
    layout = masks.sculpt4d(4, 40, block_size=16, suffix_tokens=11)
    _check(layout, *_inputs(layout, head_dim=32, dtype=dtype), key_bias=_key_bias(layout, 2))


@interpreted
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # their log-sum-exp: log(0) = -inf
def test_interpreted_rows_whose_keys_are_all_masked():
    layout = masks.temporal_only(3, 32, block_size=16, suffix_tokens=16)
    bias = torch.zeros(2, layout.seq_len)
    first_blocks = torch.cat([torch.arange(f * 32, f * 32 + 16) for f in range(3)])
    bias[1, first_blocks] = -math.inf
    bias[1, -16:] = -math.inf
    out, lse = _check(layout, *_inputs(layout), key_bias=bias)
    assert bool((out[1, :, first_blocks] == 0).all()) and bool((lse[1, :, first_blocks] == -math.inf).all())
    assert bool(torch.isfinite(lse[0]).all())


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpreted_half_precision(dtype):
    layout = masks.sculpt4d(4, 40, block_size=16, prefix_tokens=7)
    _check(layout, *_inputs(layout, head_dim=32, dtype=dtype))


@interpreted
@pytest.mark.parametrize("head_dim, value_dim", [(16, 16), (32, 32), (64, 64), (32, 16)])
def test_interpreted_head_dims_and_explicit_scale(head_dim, value_dim):
    layout = masks.fixed_stride(2, 72, block_size=32, stride=2, prefix_tokens=5)
    _check(layout, *_inputs(layout, batch=1, head_dim=head_dim, value_dim=value_dim), scale=0.37)


@interpreted
@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16)])
def test_interpreted_blocks_longer_than_the_tiles(block_m, block_n):
    # Blocks of 64 (frames of 100: a partial block of 36; a prefix of 20): several query tiles
    # per block, key runs cut into several chunks, full and partial.
    layout = masks.sculpt4d(3, 100, block_size=64, prefix_tokens=20)
    _check(layout, *_inputs(layout, batch=1, head_dim=16), block_m=block_m, block_n=block_n)


@interpreted
def test_interpreted_strided_inputs():
    layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(layout, heads=3, head_dim=32))
    v = v[:, :, :, ::2]  # and a last dimension that is not contiguous
    assert not q.is_contiguous() and v.stride(-1) == 2
    _check(layout, q, k, v)


@interpreted
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # their log-sum-exp: log(0) = -inf
def test_interpreted_rows_that_keep_nothing():
    def rule(qf, qb, kf, kb):
        return (qb == kb) & (qb != 0) | (qf == kf) & (qb > kb)

    layout = masks.build(rule, 3, 50, block_size=16)
    empty = ~layout.token_mask().any(dim=1)
    assert empty.any()
    out, lse = _check(layout, *_inputs(layout))
    assert bool((out[:, :, empty] == 0).all()) and bool((lse[:, :, empty] == -math.inf).all())


@interpreted
def test_interpreted_through_the_table_tensors():
    layout = masks.radial(3, 48, block_size=16, prefix_tokens=4)
    q, k, v = _inputs(layout, dtype=torch.float16)
    plan = tables.table_for(q, *layout.tensors()).triton_plan(q.device)
    out, lse = triton_kernel.forward(q, k, v, plan, 0.3)
    expected = dense_masked_attention(q, k, v, layout.token_mask(), 0.3)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32


# ---------------------------------------------------------------------------------------- CUDA

CUDA_SHAPES = [
    dict(frames=3, tokens_per_frame=512, block_size=128, prefix_tokens=0),
    dict(frames=3, tokens_per_frame=300, block_size=128, prefix_tokens=77),
    dict(frames=4, tokens_per_frame=256, block_size=64, prefix_tokens=0),
    dict(frames=4, tokens_per_frame=200, block_size=64, prefix_tokens=30),
]
CUDA_SHAPE_IDS = ["equal-128", "partial-prefix-128", "equal-64", "partial-prefix-64"]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=CUDA_SHAPE_IDS)
def test_cuda_kernel_matches_the_reference(dtype, head_dim, shape):
    layout = masks.sculpt4d(shape["frames"], shape["tokens_per_frame"], block_size=shape["block_size"],
                            prefix_tokens=shape["prefix_tokens"])
    _check(layout, *_inputs(layout, batch=2, heads=2, head_dim=head_dim, dtype=dtype, device="cuda"))


@gpu
@needs_cuda
@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
def test_cuda_every_policy_with_the_default_config(policy, monkeypatch):
    monkeypatch.setenv(triton_kernel.AUTOTUNE_ENV, "0")
    layout = masks.build(policy, 4, 512, block_size=128, prefix_tokens=64)
    _check(layout, *_inputs(layout, batch=1, heads=2, head_dim=128, dtype=torch.bfloat16, device="cuda"))


@gpu
@needs_cuda
def test_cuda_float32_kernel_is_exact():
    layout = masks.sculpt4d(2, 256, block_size=64, prefix_tokens=10)
    _check(layout, *_inputs(layout, batch=1, heads=2, head_dim=64, device="cuda"))


@gpu
@needs_cuda
def test_cuda_op_runs_triton_and_flex_agrees(monkeypatch):
    layout = masks.sculpt4d(4, 300, block_size=128, prefix_tokens=77)
    q, k, v = _inputs(layout, batch=1, heads=4, head_dim=128, dtype=torch.bfloat16, device="cuda")
    assert block_sparse.cuda_forward_kernel(q, v, 0.1) == "triton"
    calls = []
    original = triton_kernel.forward
    monkeypatch.setattr(triton_kernel, "forward", lambda *args, **kw: calls.append(1) or original(*args, **kw))
    ours = block_sparse_attention(q, k, v, layout)
    assert calls
    monkeypatch.setenv(block_sparse.CUDA_KERNEL_ENV, "flex")
    flex = block_sparse_attention(q, k, v, layout)
    assert len(calls) == 1
    torch.testing.assert_close(ours.float(), flex.float(), atol=2e-2, rtol=0)
    expected = dense_masked_attention(q, k, v, layout.token_mask())
    torch.testing.assert_close(ours.double(), expected, atol=2e-2, rtol=0)


# ------------------------------------------------------------------ triton_op for AOTInductor on CUDA


def _captured_joint_attention():
    import copy

    from support import JointVideoAttention
    from t4dopt.export.capture import capture_for_export

    torch.manual_seed(0)
    model = JointVideoAttention(dim=32, heads=2).eval()
    x = torch.randn(1, 4, 24, 32)
    options = {"layout": {"frames": 4, "tokens_per_frame": 24}, "sparse": {"policy": "sculpt4d", "block_size": 16}}
    gm, args, _, sites = capture_for_export(model, (x,), options, lambda line: None)
    return gm, copy.deepcopy(gm), args


def _captured_masked_attention():
    """A graph calling the op with a suffix layout and a text-padding key mask (an input of the graph)."""
    import copy

    from support import OpAttention
    from t4dopt.export.capture import capture_for_export

    layout = masks.sculpt4d(3, 24, block_size=16, suffix_tokens=9)
    model = OpAttention(layout, dim=32, heads=2).eval()
    x = torch.randn(2, layout.seq_len, 32)
    keep = torch.arange(layout.seq_len) < torch.tensor([[layout.seq_len], [layout.seq_len - 5]])
    gm, args, _, _ = capture_for_export(model, (x, keep), None, lambda line: None)
    return gm, copy.deepcopy(gm), args


@pytest.mark.skipif(INTERPRETED, reason="outside the interpreter the CPU sites have no Triton kernel")
def test_plan_sites_leaves_sites_the_kernel_cannot_run():
    from t4dopt.export.planned_sites import plan_sites

    gm, _, args = _captured_joint_attention()
    assert plan_sites(gm, args) == 0


@interpreted
@pytest.mark.parametrize("capture", [_captured_joint_attention, _captured_masked_attention],
                         ids=["joint", "suffix-key-mask"])
def test_interpreted_planned_triton_op_equals_the_op(capture):
    from t4dopt.export.planned_sites import plan_sites

    gm, original, args = capture()
    assert plan_sites(gm, args) == 1
    assert not any(n.target is torch.ops.t4d.block_sparse_attention.default for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(gm(*args), original(*args), atol=1e-5)


def _opcheck_planned(device, masked, test_utils=None):
    """opcheck of ``t4d::block_sparse_attention_planned`` on q, k, v permuted as models make them."""
    layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7, suffix_tokens=5)
    x = torch.randn(2, layout.seq_len, 3, 2, 16, device=device)
    q, k, v = x.permute(2, 0, 3, 1, 4)
    plan = _plan(layout, device=device)
    bias = _key_bias(layout, 2).to(device) if masked else None
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    torch.library.opcheck(torch.ops.t4d.block_sparse_attention_planned.default,
                          (q, k, v, plan.tiles, plan.full_starts, plan.partial_starts, plan.partial_ends,
                           plan.block_m, plan.block_n, 0.25, bias), **kwargs)


@interpreted
@pytest.mark.parametrize("masked", [False, True])
def test_interpreted_opcheck_of_the_planned_op(masked):
    # The interpreter runs a triton_op's kernel even on fake tensors (it copies their storage), so
    # the fake and AOT checks need CUDA (`test_cuda_opcheck_of_the_planned_op`).
    _opcheck_planned("cpu", masked, ("test_schema", "test_autograd_registration"))


@gpu
@needs_cuda
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_opcheck_of_the_planned_op(masked):
    _opcheck_planned("cuda", masked)
