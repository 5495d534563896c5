"""The ``t4d::block_sparse_attention`` op: exactness, gradients, registration, errors, real skipping."""

import math
import threading
import time

import pytest
import torch

from reference import dense_masked_attention, random_qkv
from t4dopt import masks
from t4dopt.ops import block_sparse, block_sparse_attention, cpu_kernel, cpu_plan, cpu_pool, flex_path, tables
from t4dopt.ops.tables import layout_tensors

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _check(layout, *, dtype=torch.float32, scale=None, device="cpu", **shape):
    q, k, v = random_qkv(layout, dtype=dtype, device=device, **shape)
    out = block_sparse_attention(q, k, v, layout, scale=scale)
    expected = dense_masked_attention(q, k, v, layout.token_mask(), scale)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.fixture(params=["default", "many-pieces", "columns", "parts", "threads"])
def plan_shape(request, monkeypatch):
    """Run a test with the default plan; with every key run a row rectangle and every key block
    shared by two query blocks a biclique (many more pieces to merge, no column rectangles); with
    every run of query blocks that keep a key group a column rectangle; cut into four parts; and
    on three worker threads with a task per batch entry and head (whatever this machine has)."""
    monkeypatch.setattr(tables, "_tables", tables.TableCache())
    if request.param == "threads":
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        monkeypatch.setattr(cpu_kernel, "TASKS_PER_WORKER", 3)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    if request.param == "many-pieces":
        monkeypatch.setattr(cpu_plan, "MIN_COLUMN_RUN_TOKENS", 1 << 30)
        monkeypatch.setattr(cpu_plan, "MIN_RUN_TOKENS", 1)
        monkeypatch.setattr(cpu_plan, "MIN_SHARED_ROWS", 2)
    elif request.param == "columns":
        monkeypatch.setattr(cpu_plan, "MIN_COLUMN_RUN_TOKENS", 1)
    elif request.param == "parts":
        monkeypatch.setattr(cpu_kernel, "part_count", lambda q: 4)
    return request.param


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
@pytest.mark.parametrize("frames", [1, 2, 5])
def test_every_policy_matches_the_dense_reference(policy, frames, plan_shape):
    # 40 tokens per frame with blocks of 16: every frame ends in a partial block of 8 tokens;
    # 7 prefix tokens form a block of their own.
    layout = masks.build(policy, frames, 40, prefix_tokens=7, block_size=16)
    _check(layout)


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
@pytest.mark.parametrize("prefix, suffix", [(0, 5), (0, 40), (7, 21)], ids=["suffix5", "suffix40", "both"])
def test_global_tokens_after_the_video_match_the_dense_reference(policy, prefix, suffix, plan_shape):
    # Text after the video (HunyuanVideo, Mochi: [video, text]): a partial suffix block, whole
    # suffix blocks, and global tokens on both sides.
    layout = masks.build(policy, 3, 40, prefix_tokens=prefix, suffix_tokens=suffix, block_size=16)
    _check(layout)


def test_a_user_rule_with_rows_that_keep_nothing():
    # Query block 0 of every frame keeps no key block: its rows come out as zeros.
    def rule(qf, qb, kf, kb):
        return (qb == kb) & (qb != 0) | (qf == kf) & (qb > kb)

    layout = masks.build(rule, 3, 50, block_size=16)
    assert not bool(layout.to_dense().any(dim=1).all())
    _check(layout)


def test_large_frames_use_rectangles_bicliques_and_gathers():
    layout = masks.sculpt4d(6, 320, block_size=32, prefix_tokens=24)
    plan = cpu_plan.build_plan(layout.to_dense(), layout.block_starts)
    query_tokens = {group.q_index.shape[1] * plan.unit for part in plan.parts for group in part.gathered}
    assert any(part.rects for part in plan.parts) and min(query_tokens) <= 32 < max(query_tokens)
    _check(layout, batch=1, heads=2, head_dim=32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    layout = masks.sculpt4d(5, 40, block_size=16, prefix_tokens=7)
    _check(layout, dtype=dtype)


@pytest.mark.parametrize("head_dim, value_dim", [(32, 32), (16, 24), (32, 8)])
def test_head_sizes_and_explicit_scale(head_dim, value_dim):
    layout = masks.fixed_stride(2, 72, block_size=32, stride=2, prefix_tokens=5)
    _check(layout, head_dim=head_dim, value_dim=value_dim, scale=0.37)


def test_stridedrandom_qkv():
    layout = masks.sculpt4d(3, 40, block_size=16)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in random_qkv(layout))
    assert not q.is_contiguous()
    out = block_sparse_attention(q, k, v, layout)
    torch.testing.assert_close(out.double(), dense_masked_attention(q, k, v, layout.token_mask()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("suffix", [0, 13])
def test_gradients_match_the_reference(dtype, tolerance, suffix, plan_shape):
    layout = masks.sculpt4d(5, 40, block_size=16, prefix_tokens=7, suffix_tokens=suffix)
    q, k, v = (x.requires_grad_() for x in random_qkv(layout, dtype=dtype, value_dim=24))
    grad = torch.randn(q.shape[:-1] + (24,), dtype=dtype)
    block_sparse_attention(q, k, v, layout, scale=0.3).backward(grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    dense_masked_attention(*leaves, layout.token_mask(), 0.3).backward(grad.double())
    for ours, expected in zip((q, k, v), leaves):
        assert ours.grad.dtype == dtype
        torch.testing.assert_close(ours.grad.double(), expected.grad, atol=tolerance, rtol=tolerance)


def _permuted_qkv(layout, batch=2, heads=2, head_dim=16, value_dim=None, requires_grad=False):
    """q, k, v as a model makes them: ``qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)`` (not contiguous)."""
    generator = torch.Generator().manual_seed(3)
    n = layout.seq_len
    x = torch.randn(batch, n, 3, heads, head_dim, generator=generator)
    q, k, v = x.permute(2, 0, 3, 1, 4)
    if value_dim is not None:
        v = v[..., :value_dim]
    assert not q.is_contiguous()
    return tuple(t.detach().requires_grad_(requires_grad) for t in (q, k, v))


def _padding_mask(batch, seq_len, valid):
    """bool [batch, seq_len]: the first valid[b] keys of batch element b kept (a text-padding mask)."""
    return torch.arange(seq_len).unsqueeze(0) < torch.tensor(valid).unsqueeze(1)


OPCHECK_CASES = {
    "contiguous": dict(permuted=False, value_dim=None, key_mask=None),
    "permuted": dict(permuted=True, value_dim=None, key_mask=None),
    "narrow-v": dict(permuted=True, value_dim=8, key_mask=None),
    "bool-key-mask": dict(permuted=True, value_dim=None, key_mask="bool"),
    "additive-key-mask": dict(permuted=True, value_dim=8, key_mask="additive"),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_forward_and_backward(case):
    """Fakes against the kernels (strides included), autograd, and the registrations, on the inputs models give."""
    spec = OPCHECK_CASES[case]
    layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7, suffix_tokens=5)
    if spec["permuted"]:
        q, k, v = _permuted_qkv(layout, value_dim=spec["value_dim"])
    else:
        q, k, v = random_qkv(layout, batch=2, heads=2)
    mask = None
    if spec["key_mask"] is not None:
        mask = _padding_mask(2, layout.seq_len, [layout.seq_len, layout.seq_len - 3])
        if spec["key_mask"] == "additive":
            mask = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    table = (*layout.tensors("cpu"), layout.block_size, None, mask)
    forward = torch.ops.t4d.block_sparse_attention.default
    for requires_grad in (True, False):
        torch.library.opcheck(forward, tuple(x.detach().requires_grad_(requires_grad) for x in (q, k, v)) + table)
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],)).transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.t4d.block_sparse_attention_backward.default, (grad, q, k, v, *table))


def test_fakes_return_the_strides_the_kernels_return():
    layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7)
    q, k, v = _permuted_qkv(layout, value_dim=8)
    out = block_sparse_attention(q, k, v, layout)
    grads = torch.ops.t4d.block_sparse_attention_backward(torch.randn_like(out), q, k, v, *layout.tensors(),
                                                          layout.block_size, None)
    assert out.is_contiguous() and all(g.is_contiguous() for g in grads)


@pytest.mark.inductor
@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_backward_of_permuted_qkv():
    """Issue 14 item 3: q, k, v from ``qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)``, ``.sum().backward()``
    under Inductor; the backward's fake kept q's strides and Inductor's stride assertion failed. One compile."""
    layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7, suffix_tokens=5)
    torch.manual_seed(0)
    qkv = torch.nn.Linear(32, 3 * 32)
    x = torch.randn(2, layout.seq_len, 32)

    def attention(x):
        b, n, _ = x.shape
        q, k, v = qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return block_sparse_attention(q, k, v, layout)

    compiled = torch.compile(attention, backend="inductor", fullgraph=True)
    x_compiled = x.clone().requires_grad_()
    compiled(x_compiled).sum().backward()
    x_eager = x.clone().requires_grad_()
    b, n, _ = x.shape
    q, k, v = qkv(x_eager).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
    dense_masked_attention(q, k, v, layout.token_mask()).sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad.float(), atol=1e-4, rtol=1e-4)


def test_fake_tensor_output_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = masks.sculpt4d(2, 40, block_size=16)
    seq_len, tables = layout.seq_len, layout.tensors("cpu")
    with FakeTensorMode() as mode:
        q = torch.empty(2, 3, seq_len, 16)
        v = torch.empty(2, 3, seq_len, 8)
        out = torch.ops.t4d.block_sparse_attention(q, q, v, *(mode.from_tensor(t) for t in tables),
                                                    layout.block_size, None)
    assert out.shape == (2, 3, seq_len, 8) and out.dtype == torch.float32


def test_compiled_with_eager_backend_fullgraph():
    layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7)
    tables = layout.tensors("cpu")

    def with_op(q, k, v):
        return torch.ops.t4d.block_sparse_attention(q * 2, k, v, *tables, layout.block_size, 0.25) + 1

    def with_wrapper(q, k, v):
        return block_sparse_attention(q * 2, k, v, layout, scale=0.25) + 1

    q, k, v = random_qkv(layout)
    for fn in (with_op, with_wrapper):
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v), with_op(q, k, v), atol=1e-6, rtol=0)


def test_compiled_with_aot_eager_backend_forward_and_backward():
    layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7)

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, layout).sum(dim=-1)

    q, k, v = (x.requires_grad_() for x in random_qkv(layout))
    out = torch.compile(fn, backend="aot_eager")(q, k, v)
    out.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    expected = fn(q, k, v)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    for got, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    layout = masks.sculpt4d(2, 40, block_size=16)
    q, k, v = random_qkv(layout)
    with pytest.raises(TypeError, match=r"torch\.int32.*float32, float16, bfloat16"):
        block_sparse_attention(q.int(), k.int(), v.int(), layout)
    with pytest.raises(TypeError, match="share one dtype"):
        block_sparse_attention(q, k.double(), v, layout)
    with pytest.raises(ValueError, match="N=70 tokens.*covers 80"):
        block_sparse_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], layout)
    with pytest.raises(ValueError, match="N=70 tokens but the block table covers 80"):
        torch.ops.t4d.block_sparse_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], *layout.tensors(), 16, None)
    with pytest.raises(ValueError, match="4-D"):
        block_sparse_attention(q[0], k[0], v[0], layout)
    with pytest.raises(ValueError, match="expand grouped"):
        block_sparse_attention(q, k[:, :1], v[:, :1], layout)
    with pytest.raises(TypeError, match="BlockLayout"):
        block_sparse_attention(q, k, v, layout.to_dense())
    counts, indices, starts = layout.tensors()
    with pytest.raises(ValueError, match="kv_indices must name key blocks"):
        torch.ops.t4d.block_sparse_attention(q, k, v, counts, indices + 100, starts, 16, None)


def test_layout_tensors_and_plans_are_built_once():
    layout = masks.sculpt4d(2, 40, block_size=16)
    assert layout_tensors(layout, torch.device("cpu")) is layout_tensors(layout, torch.device("cpu"))
    q, k, v = random_qkv(layout)
    calls = []
    original = tables.build_cpu_plan
    try:
        tables.build_cpu_plan = lambda *args: calls.append(1) or original(*args)
        for _ in range(3):
            block_sparse_attention(q, k, v, layout)
        # Equal tables (other tensors, same content) share the plan as well.
        block_sparse_attention(q, k, v, masks.sculpt4d(2, 40, block_size=16))
    finally:
        tables.build_cpu_plan = original
    assert len(calls) <= 1


def test_work_is_exactly_the_kept_pairs(monkeypatch, plan_shape):
    """Count what the kernel hands to the dense attention kernel: the kept token pairs, no more."""
    computed = []

    def counting_attend(q, k, v, scale, bias=None):
        computed.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return original(q, k, v, scale, bias)

    original = cpu_kernel._attend
    monkeypatch.setattr(cpu_kernel, "_attend", counting_attend)
    for layout in (masks.sculpt4d(8, 100, block_size=16, prefix_tokens=7), masks.temporal_only(6, 64, block_size=16)):
        computed.clear()
        q, k, v = random_qkv(layout)
        block_sparse_attention(q, k, v, layout)
        kept_pairs = int(layout.token_mask().sum())
        assert sum(computed) == kept_pairs * q.shape[0] * q.shape[1]
        assert cpu_plan.build_plan(layout.to_dense(), layout.block_starts).pairs == kept_pairs
        assert kept_pairs < 0.7 * layout.seq_len ** 2


def test_parts_cover_every_row_once_and_split_the_work():
    layout = masks.sculpt4d(8, 100, block_size=16, prefix_tokens=7)
    whole = cpu_plan.build_plan(layout.to_dense(), layout.block_starts)
    for count in (2, 3, 5):
        plan = cpu_plan.build_plan(layout.to_dense(), layout.block_starts, count)
        ranges = sorted((part.first, part.end) for part in plan.parts)
        assert len(ranges) == count and ranges[0][0] == 0 and ranges[-1][1] == len(layout.block_starts) - 1
        assert all(end == next_first for (_, end), (next_first, _) in zip(ranges, ranges[1:]))
        assert plan.pairs == whole.pairs
        assert max(part.pairs for part in plan.parts) < 2.5 * plan.pairs / count


def test_large_query_runs_attend_whole_key_groups_on_views():
    """Sculpt4D's window and anchor frames become column rectangles with many query rows (the flash
    kernel's large tiles start at 768 rows): every rectangle of 8 x 512 tokens has at least 1024."""
    layout = masks.sculpt4d(8, 512, block_size=64)
    (part,) = cpu_plan.build_plan(layout.to_dense(), layout.block_starts).parts
    assert part.rects and min(rect.q_end - rect.q_start for rect in part.rects) >= 1024
    assert sum(1 for rect in part.rects if (rect.q_start, rect.q_end, rect.k_start) == (0, 4096, 0)) == 1


def _pool_task(seen, index):
    seen[index] = (threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(),
                   torch.is_inference_mode_enabled())
    time.sleep(0.01)  # long enough that every worker takes a task


@pytest.mark.parametrize("inference", [False, True])
def test_the_pool_runs_tasks_on_single_threaded_workers_in_the_callers_mode(inference):
    pool = cpu_pool.WorkerPool()
    threads = torch.get_num_threads()
    seen = {}
    with torch.inference_mode(inference):
        pool.run([lambda index=index: _pool_task(seen, index) for index in range(6)], workers=2)
    assert sorted(seen) == list(range(6)) and pool.size == 2
    workers = {ident for ident, *_ in seen.values()}
    assert len(workers) == 2 and threading.get_ident() not in workers
    assert {state[1:] for state in seen.values()} == {(1, False, inference)}
    assert torch.get_num_threads() == threads  # the workers' setting does not leak into the caller


def test_the_pool_raises_a_tasks_error_and_runs_one_worker_inline():
    pool = cpu_pool.WorkerPool()

    def fail():
        raise ValueError("task failed")

    with pytest.raises(ValueError, match="task failed"):
        pool.run([fail, lambda: None, lambda: None], workers=2)
    ran = []
    pool.run([lambda: ran.append(threading.get_ident())] * 3, workers=2)  # the pool still works
    inline = cpu_pool.WorkerPool()
    inline.run([lambda: ran.append(threading.get_ident())] * 2, workers=1)
    assert len(ran) == 5 and ran[3:] == [threading.get_ident()] * 2 and inline.size == 0


def test_inference_mode_then_normal_calls():
    """The gather buffers, kept between calls, are made outside inference mode: one made during an
    inference-mode call is written again by a normal call (and by the workers of either)."""
    layout = masks.sculpt4d(4, 128, block_size=16)
    q, k, v = random_qkv(layout)
    expected = dense_masked_attention(q, k, v, layout.token_mask())
    with torch.inference_mode():
        inferred = block_sparse_attention(q, k, v, layout)
    assert inferred.is_inference()
    for out in (inferred, block_sparse_attention(q, k, v, layout)):
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def _fastest_of(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_sparse_layouts_run_faster():
    """Density 1/8 against density 1 on the same tokens: at least 2x faster (ideal 8x, about 6x here).

    On one thread: with several, a run of short parallel calls stalls whenever another process
    takes a core, which says nothing about the work done.
    """
    sparse = masks.temporal_only(8, 512, block_size=64)
    dense = masks.window(8, 512, block_size=64, window=8)
    assert sparse.density == pytest.approx(1 / 8) and dense.density == 1.0
    q, k, v = random_qkv(sparse, batch=1, heads=2, head_dim=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sparse_time = _fastest_of(lambda: block_sparse_attention(q, k, v, sparse))
        dense_time = _fastest_of(lambda: block_sparse_attention(q, k, v, dense))
    finally:
        torch.set_num_threads(threads)
    assert dense_time > 2 * sparse_time, f"dense {dense_time * 1e3:.2f} ms, sparse {sparse_time * 1e3:.2f} ms"


def _expand_block_mask(block_mask, seq_len):
    """Token-level bool [N, N] of a BlockMask: full tiles, plus partial tiles where mask_mod holds."""
    tile = block_mask.BLOCK_SIZE[0]
    tiles = -(-seq_len // tile)

    def tile_mask(counts, indices):
        dense = torch.zeros(tiles, tiles, dtype=torch.bool)
        for row in range(tiles):
            dense[row, indices[0, 0, row, : counts[0, 0, row]].long()] = True
        return dense.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:seq_len, :seq_len]

    full = tile_mask(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    partial = tile_mask(block_mask.kv_num_blocks, block_mask.kv_indices)
    tokens = torch.arange(seq_len)
    zero = torch.zeros((), dtype=torch.int64)
    mod = block_mask.mask_mod(zero, zero, tokens.view(-1, 1), tokens.view(1, -1))
    return full | (partial & mod)


@pytest.mark.parametrize("layout", [
    masks.sculpt4d(4, 256, block_size=128),
    masks.sculpt4d(4, 512, block_size=256),
    masks.sculpt4d(3, 200, block_size=128, prefix_tokens=77),
    masks.sculpt4d(5, 96, block_size=64, prefix_tokens=10),
    masks.radial(4, 300, block_size=32),
    masks.sculpt4d(3, 256, block_size=128, suffix_tokens=77),
    masks.window(4, 200, block_size=64, prefix_tokens=10, suffix_tokens=150),
], ids=["equal-128", "equal-256", "partial-prefix-128", "small-blocks-64", "radial-32", "suffix-128",
        "prefix-suffix-64"])
def test_flex_block_mask_reproduces_the_token_mask(layout):
    block_mask = flex_path.build_block_mask(layout.to_dense(), layout.block_starts, layout.block_size,
                                            torch.device("cpu"))
    assert block_mask.seq_lengths == (layout.seq_len, layout.seq_len)
    assert torch.equal(_expand_block_mask(block_mask, layout.seq_len), layout.token_mask())


def test_flex_equal_blocks_map_one_to_one_onto_full_tiles():
    layout = masks.sculpt4d(4, 512, block_size=128, prefix_tokens=128)
    table = flex_path.tile_table(layout.to_dense(), layout.block_starts, flex_path.tile_size(128))
    assert not table.partial.any()
    assert torch.equal(table.full, layout.to_dense())
    block_mask = flex_path.build_block_mask(layout.to_dense(), layout.block_starts, 128, torch.device("cpu"))
    assert int(block_mask.kv_num_blocks.sum()) == 0
    assert block_mask.mask_mod.__name__ == "noop_mask"


def test_flex_tiles_for_unequal_blocks():
    layout = masks.sculpt4d(3, 200, block_size=128, prefix_tokens=77)
    table = flex_path.tile_table(layout.to_dense(), layout.block_starts, 128)
    assert table.partial.any() and table.full.any()
    assert not (table.partial & table.full).any()


@pytest.mark.inductor
def test_flex_path_through_flex_attention_compiled_for_cpu():
    """Our BlockMask (full and partial tiles, mask_mod, prefix) in FlexAttention itself; ~10 s of compile."""
    layout = masks.sculpt4d(3, 200, block_size=128, prefix_tokens=77)
    block_mask = flex_path.build_block_mask(layout.to_dense(), layout.block_starts, 128, torch.device("cpu"))
    q, k, v = random_qkv(layout, batch=1, heads=2, head_dim=32)
    out = flex_path.forward(q, k, v, block_mask, 0.3)
    torch.testing.assert_close(out.double(), dense_masked_attention(q, k, v, layout.token_mask(), 0.3),
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- key masks

def _check_masked(layout, key_mask, *, dtype=torch.float32, scale=None, device="cpu", **shape):
    q, k, v = random_qkv(layout, dtype=dtype, device=device, **shape)
    out = block_sparse_attention(q, k, v, layout, scale=scale, key_mask=key_mask.to(device))
    expected = dense_masked_attention(q, k, v, layout.token_mask(), scale, key_mask=key_mask)
    assert out.dtype == dtype and out.shape == expected.shape and not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)
    return out


def _text_padding(layout, valid_text):
    """HunyuanVideo's mask: video tokens, then text of which the first valid_text[b] tokens are real."""
    text = layout.grid.suffix_tokens
    video = layout.seq_len - text
    return _padding_mask(len(valid_text), layout.seq_len, [video + t for t in valid_text])


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
def test_text_padding_key_mask_matches_the_reference(policy, plan_shape):
    # [video, text] with 21 text tokens, of which 21 and 4 are real in the two batch entries.
    layout = masks.build(policy, 3, 40, suffix_tokens=21, block_size=16)
    _check_masked(layout, _text_padding(layout, [21, 4]))


@pytest.mark.parametrize("form", ["bool", "additive", "bias"])
@pytest.mark.parametrize("prefix, suffix", [(7, 0), (0, 13), (7, 13)])
def test_key_masks_of_every_form(form, prefix, suffix, plan_shape):
    layout = masks.sculpt4d(4, 40, block_size=16, prefix_tokens=prefix, suffix_tokens=suffix)
    generator = torch.Generator().manual_seed(1)
    keep = torch.rand(2, layout.seq_len, generator=generator) > 0.3
    if form == "bool":
        mask = keep
    else:
        values = torch.randn(2, layout.seq_len, generator=generator) if form == "bias" else torch.zeros(keep.shape)
        mask = values.masked_fill(~keep, -math.inf)
    _check_masked(layout, mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_key_mask_dtypes(dtype):
    layout = masks.sculpt4d(3, 40, block_size=16, suffix_tokens=9)
    _check_masked(layout, _text_padding(layout, [9, 2]), dtype=dtype)


def test_rows_whose_keys_are_all_masked_are_zeros_as_in_sdpa(plan_shape):
    """A query block keeping only key blocks the mask removes entirely: zeros (not NaN), as torch 2.13's SDPA."""
    layout = masks.temporal_only(3, 32, block_size=16)   # block 0 of a frame attends block 0 of every frame
    keep = torch.ones(2, layout.seq_len, dtype=torch.bool)
    first_blocks = torch.cat([torch.arange(f * 32, f * 32 + 16) for f in range(3)])
    keep[1, first_blocks] = False
    out = _check_masked(layout, keep)
    empty_rows = first_blocks
    assert bool((out[1, :, empty_rows] == 0).all()) and bool((out[0, :, empty_rows] != 0).any())
    q, k, v = random_qkv(layout)
    combined = layout.token_mask() & keep[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=combined)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=0)
    # A hand-written softmax over the same mask gives NaN on those rows: what "zeros" replaces.
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~combined, -math.inf)
    assert scores.softmax(dim=-1)[1, :, empty_rows].isnan().all()


def test_gradients_with_a_key_mask_match_the_reference(plan_shape):
    layout = masks.temporal_only(3, 32, block_size=16, suffix_tokens=7)
    keep = torch.ones(2, layout.seq_len, dtype=torch.bool)
    keep[1, torch.cat([torch.arange(f * 32, f * 32 + 16) for f in range(3)])] = False   # rows left with no key
    keep[0, -3:] = False
    mask = torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    q, k, v = (x.requires_grad_() for x in random_qkv(layout, value_dim=24))
    grad = torch.randn(q.shape[:-1] + (24,))
    block_sparse_attention(q, k, v, layout, scale=0.3, key_mask=mask).backward(grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    dense_masked_attention(*leaves, layout.token_mask(), 0.3, key_mask=mask).backward(grad.double())
    for ours, expected in zip((q, k, v), leaves):
        assert not ours.grad.isnan().any()
        torch.testing.assert_close(ours.grad.double(), expected.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask", [torch.ones(2, 125, dtype=torch.bool), torch.zeros(2, 125),
                                  torch.ones(1, 125, dtype=torch.bool)], ids=["bool", "additive", "broadcast"])
def test_a_key_mask_that_keeps_every_key_runs_the_unmasked_path(mask, monkeypatch):
    layout = masks.sculpt4d(3, 40, block_size=16, suffix_tokens=5)
    seen = []
    original = cpu_kernel.forward
    monkeypatch.setattr(cpu_kernel, "forward", lambda *args: seen.append(args[5] if len(args) > 5 else None)
                        or original(*args))
    q, k, v = random_qkv(layout)
    with_mask = block_sparse_attention(q, k, v, layout, key_mask=mask)
    assert seen == [None]
    assert torch.equal(with_mask, block_sparse_attention(q, k, v, layout))
    mask = mask.clone()
    mask[0, 3] = False if mask.dtype == torch.bool else -math.inf
    block_sparse_attention(q, k, v, layout, key_mask=mask)
    assert seen[-1] is not None and seen[-1].shape == (2, layout.seq_len)


def test_the_wrapper_takes_sdpas_key_padding_shape():
    layout = masks.sculpt4d(3, 40, block_size=16, suffix_tokens=9)
    mask = _text_padding(layout, [9, 3])
    q, k, v = random_qkv(layout)
    expected = block_sparse_attention(q, k, v, layout, key_mask=mask)
    assert torch.equal(block_sparse_attention(q, k, v, layout, key_mask=mask[:, None, None, :]), expected)


def test_key_mask_errors():
    layout = masks.sculpt4d(2, 40, block_size=16)
    q, k, v = random_qkv(layout)
    tables_ = (*layout.tensors(), 16, None)
    with pytest.raises(ValueError, match=r"key_mask must be \[B, N\]"):
        torch.ops.t4d.block_sparse_attention(q, k, v, *tables_, torch.ones(2, 79, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_mask must be \[B, N\]"):
        torch.ops.t4d.block_sparse_attention(q, k, v, *tables_, torch.ones(3, 80, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool .* or floating point"):
        torch.ops.t4d.block_sparse_attention(q, k, v, *tables_, torch.ones(2, 80, dtype=torch.int64))
    bias = torch.zeros(2, 80, requires_grad=True)
    with pytest.raises(ValueError, match="key_mask requires grad"):
        block_sparse_attention(q.requires_grad_(), k, v, layout, key_mask=bias)


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_structured_mask_intersected_with_the_policy(frames_per_block, plan_shape):
    """Diffusion forcing (block-causal over frames) and text padding at once, against both masks applied densely."""
    frames, tokens = 4, 40
    layout = masks.sculpt4d(frames, tokens, block_size=16, suffix_tokens=11)
    causal = masks.frame_causal(frames, tokens, block_size=16, frames_per_block=frames_per_block, suffix_tokens=11)
    both = layout & causal
    q, k, v = random_qkv(layout)
    key_mask = _text_padding(layout, [11, 5])
    out = block_sparse_attention(q, k, v, both, key_mask=key_mask)
    frame = torch.tensor([f for f in range(frames) for _ in range(tokens)] + [-1] * 11)
    video = frame >= 0
    model_mask = (frame.view(1, -1) // frames_per_block <= frame.view(-1, 1) // frames_per_block) \
        | ~video.view(1, -1) | ~video.view(-1, 1)
    expected = dense_masked_attention(q, k, v, layout.token_mask() & model_mask, key_mask=key_mask)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    assert both.density < layout.density


def test_compiled_with_aot_eager_and_a_key_mask():
    layout = masks.sculpt4d(3, 40, block_size=16, suffix_tokens=9)
    mask = _text_padding(layout, [9, 4])

    def fn(q, k, v, mask):
        return block_sparse_attention(q, k, v, layout, key_mask=mask).sum(dim=-1)

    q, k, v = (x.requires_grad_() for x in random_qkv(layout))
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, mask)
    out.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    expected = fn(q, k, v, mask)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    for got, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.inductor
def test_flex_path_with_a_key_mask_through_flex_attention_compiled_for_cpu():
    """The CUDA path's score_mod and BlockMask in FlexAttention itself (CPU), rows left with no key included."""
    layout = masks.temporal_only(3, 256, block_size=128, suffix_tokens=77)
    first_blocks = torch.cat([torch.arange(f * 256, f * 256 + 128) for f in range(3)])
    keep = torch.ones(2, layout.seq_len, dtype=torch.bool)
    keep[1, first_blocks] = False   # the first block of each frame attends those of every frame and the text,
    keep[1, -77:] = False           # ... and the text is all padding: no key left for those rows
    keep[0, -30:] = False
    q, k, v = random_qkv(layout, batch=2, heads=2, head_dim=32)
    block_mask = flex_path.build_block_mask(layout.to_dense(), layout.block_starts, 128, torch.device("cpu"))
    bias = torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    out = flex_path.forward(q, k, v, block_mask, 0.3, bias)
    assert out.is_contiguous() and not out.isnan().any()
    expected = dense_masked_attention(q, k, v, layout.token_mask(), 0.3, key_mask=keep)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    assert bool((out[1, :, first_blocks] == 0).all()) and bool((out[0, :, first_blocks] != 0).any())


# ----------------------------------------------------------------------------- CUDA (FlexAttention)

@gpu
@needs_cuda
@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
def test_cuda_every_policy(policy):
    layout = masks.build(policy, 4, 512, block_size=128)
    _check(layout, device="cuda", dtype=torch.bfloat16, batch=1, heads=2, head_dim=64)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", [
    dict(frames=3, tokens_per_frame=512, block_size=128, prefix_tokens=0),
    dict(frames=3, tokens_per_frame=300, block_size=128, prefix_tokens=77),
    dict(frames=4, tokens_per_frame=256, block_size=64, prefix_tokens=0),
], ids=["equal", "partial-prefix", "block-64"])
def test_cuda_dtypes_head_dims_and_partial_blocks(dtype, head_dim, shape):
    layout = masks.sculpt4d(shape["frames"], shape["tokens_per_frame"], block_size=shape["block_size"],
                            prefix_tokens=shape["prefix_tokens"])
    _check(layout, device="cuda", dtype=dtype, batch=2, heads=2, head_dim=head_dim)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-3), (torch.bfloat16, 6e-2)])
def test_cuda_backward(dtype, tolerance):
    layout = masks.sculpt4d(3, 300, block_size=128, prefix_tokens=77)
    q, k, v = (x.requires_grad_() for x in random_qkv(layout, device="cuda", dtype=dtype, head_dim=64))
    grad = torch.randn_like(q)
    block_sparse_attention(q, k, v, layout).backward(grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    dense_masked_attention(*leaves, layout.token_mask()).backward(grad.double())
    for ours, expected in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad.double(), expected.grad, atol=tolerance, rtol=tolerance)


@gpu
@needs_cuda
def test_cuda_matches_cpu_kernel():
    layout = masks.sculpt4d(4, 512, block_size=128)
    q, k, v = random_qkv(layout, batch=1, heads=4, head_dim=64)
    cpu = block_sparse_attention(q, k, v, layout)
    cuda = block_sparse_attention(q.cuda(), k.cuda(), v.cuda(), layout)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-2, rtol=1e-2)
    assert math.isfinite(float(cuda.abs().max()))
