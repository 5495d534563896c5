import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# torch.onnx's exporter trips over its own pytree deprecation; nothing this package controls.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

import t4dopt  # noqa: E402
from reference import dense_masked_attention  # noqa: E402
from support import JointVideoAttention, OpAttention  # noqa: E402
from t4dopt.cli import main  # noqa: E402
from t4dopt.export import custom_domain, export_onnx, onnx_session  # noqa: E402
from t4dopt.export.portable import PortableTables, portable_attention  # noqa: E402
from t4dopt.models import Sculpt4DDiT, make_inputs  # noqa: E402

TOLERANCE = 1e-4
TINY_OPTIONS = {"layout": {"frames": 4, "tokens_per_frame": 40}, "sparse": {"policy": "sculpt4d", "block_size": 16}}
PREFIX_OPTIONS = {"layout": {"frames": 4, "tokens_per_frame": 40, "prefix_tokens": 5},
                  "sparse": {"policy": "sculpt4d", "block_size": 16}}


def needs_extensions():
    pytest.importorskip("onnxruntime_extensions")


def eager_turbo4d(model, args, options):
    with torch.no_grad():
        return torch.compile(model, backend="turbo4d", options={**options, "target": "eager"})(*args)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Sculpt4DDiT("tiny", tokens_per_frame=40).eval()   # 40 tokens: blocks of 16, 16 and 8
    noise, cond = make_inputs(model.config)
    args = (noise, torch.full((1,), 0.5), cond)
    return model, args, eager_turbo4d(model, args, TINY_OPTIONS)


@pytest.fixture(scope="module")
def tiny_exports(tiny, tmp_path_factory):
    model, args, _ = tiny
    folder = tmp_path_factory.mktemp("onnx")
    return {ops: export_onnx(model, args, folder / f"tiny-{ops}.onnx", options=TINY_OPTIONS, ops=ops)
            for ops in ("custom", "portable")}


def max_difference(path, args, expected):
    return float(np.abs(onnx_session.run(path, args)[0] - expected.numpy()).max())


def test_custom_export_writes_t4d_nodes_with_the_block_table(tiny_exports):
    result = tiny_exports["custom"]
    assert result.sites_rewritten == 2 and len(result.sites) == 6
    onnx.checker.check_model(str(result.path), full_check=True)
    model = onnx.load(str(result.path))
    assert {(o.domain, o.version) for o in model.opset_import} >= {("t4d", 1)}
    nodes = [n for n in model.graph.node if n.domain == "t4d"]
    assert len(nodes) == 2 and all(n.op_type == "BlockSparseAttention" for n in nodes)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["block_size"] == 16 and math.isclose(attributes["scale"], 16 ** -0.5, rel_tol=1e-6)
    assert attributes["layout"].startswith(b"sculpt4d(") and b"tokens_per_frame=40" in attributes["layout"]
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    table = t4dopt.masks.sculpt4d(4, 40, block_size=16)
    for name, expected in zip(nodes[0].input[3:], table.tensors()):
        np.testing.assert_array_equal(initializers[name], expected.numpy())


def test_custom_export_runs_in_onnxruntime_through_the_plugin(tiny, tiny_exports):
    needs_extensions()
    _, args, expected = tiny
    assert max_difference(tiny_exports["custom"].path, args, expected) <= TOLERANCE


def test_portable_export_has_standard_ops_only_and_matches_eager(tiny, tiny_exports):
    _, args, expected = tiny
    path = tiny_exports["portable"].path
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} == {""}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert max_difference(path, args, expected) <= TOLERANCE


def test_portable_export_scores_only_the_kept_blocks(tiny_exports):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_exports["portable"].path)))
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in model.graph.value_info}
    layout = t4dopt.masks.sculpt4d(4, 40, block_size=16)
    blocks, max_kv = layout.kv_indices.shape
    joint = [shapes[n.input[0]] for n in model.graph.node
             if n.op_type == "Softmax" and len(shapes[n.input[0]]) == 5]
    assert joint == [(1, 4, blocks, 16, max_kv * 16)] * 2
    assert not any(s[-2:] == (160, 160) for s in shapes.values() if len(s) >= 2)


@pytest.mark.parametrize("ops", ["custom", "portable"])
def test_prefix_tokens_export_matches_eager(ops, tmp_path):
    if ops == "custom":
        needs_extensions()
    torch.manual_seed(0)
    model = JointVideoAttention(dim=32, heads=2, prefix=5).eval()
    x = torch.randn(1, 4, 40, 32)
    result = export_onnx(model, (x,), tmp_path / "prefix.onnx", options=PREFIX_OPTIONS, ops=ops)
    assert result.sites_rewritten == 1
    onnx.checker.check_model(str(result.path), full_check=True)
    assert max_difference(result.path, (x,), eager_turbo4d(model, (x,), PREFIX_OPTIONS)) <= TOLERANCE


SUFFIX_LAYOUT = t4dopt.masks.sculpt4d(3, 24, block_size=16, suffix_tokens=9)
"""[video, text] as HunyuanVideo joins it: 3 frames of 24 tokens, then 9 text tokens (a partial block)."""


def text_padding(layout, valid_text):
    """bool [B, N]: the video and the first valid_text[b] text tokens kept."""
    video = layout.seq_len - layout.grid.suffix_tokens
    return torch.arange(layout.seq_len).unsqueeze(0) < torch.tensor([[video + t] for t in valid_text])


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "text-padding"])
@pytest.mark.parametrize("ops", ["custom", "portable"])
def test_suffix_tokens_and_key_masks_in_onnxruntime(ops, masked, tmp_path):
    """Text after the video, with and without a padding mask, through both ONNX forms, against float64."""
    if ops == "custom":
        needs_extensions()
    model = OpAttention(SUFFIX_LAYOUT).eval()
    x = torch.randn(2, SUFFIX_LAYOUT.seq_len, 32)
    keep = text_padding(SUFFIX_LAYOUT, [9, 2])
    args = (x, keep) if masked else (x,)
    result = export_onnx(model, args, tmp_path / "suffix.onnx", ops=ops)
    onnx.checker.check_model(str(result.path), full_check=True)
    graph = onnx.load(str(result.path)).graph
    expected_types = {"custom": {("t4d", "MaskedBlockSparseAttention" if masked else "BlockSparseAttention")},
                      "portable": set()}[ops]
    assert {(n.domain, n.op_type) for n in graph.node if n.domain} == expected_types
    with torch.no_grad():
        expected = model.reference(x, SUFFIX_LAYOUT.token_mask(), keep if masked else None)
    got = onnx_session.run(result.path, args)[0]
    assert float(np.abs(got - expected.numpy()).max()) <= TOLERANCE


def test_layout_attribute_names_the_token_grid_with_suffix_tokens(tmp_path):
    model = OpAttention(SUFFIX_LAYOUT).eval()
    result = export_onnx(model, (torch.randn(1, SUFFIX_LAYOUT.seq_len, 32),), tmp_path / "suffix.onnx")
    from onnxscript import ir

    program = ir.load(str(result.path))
    custom_domain.annotate_layouts(program, [t4dopt.masks.window(3, 24, block_size=16), SUFFIX_LAYOUT])
    node = next(n for n in program.graph.all_nodes() if n.domain == "t4d")
    assert node.attributes["layout"].value == SUFFIX_LAYOUT.describe()
    assert "suffix_tokens=9" in SUFFIX_LAYOUT.describe() and "frames=3, tokens_per_frame=24" in SUFFIX_LAYOUT.describe()
    custom_domain.annotate_layouts(program, [])
    assert node.attributes["layout"].value == "custom"


def empty_row_layout():
    """Prefix of 3 tokens, partial blocks, and frame 0 keeping no key block at all."""
    return t4dopt.masks.from_rule(lambda qf, qb, kf, kb: (qf > 0) & (kf == qf) & ((qb - kb) % 2 == 0),
                                  3, 20, block_size=8, prefix_tokens=0)


PORTABLE_LAYOUTS = [t4dopt.masks.sculpt4d(4, 40, block_size=16, prefix_tokens=5), empty_row_layout(),
                    t4dopt.masks.sculpt4d(3, 40, block_size=16, prefix_tokens=5, suffix_tokens=21)]
PORTABLE_IDS = ["prefix-partial", "empty-rows", "prefix-suffix"]


def key_masks_for(layout):
    """None; a bool mask removing keys (whole blocks' worth in batch entry 1); an additive one with a bias;
    one keeping only the last 3 keys in batch entry 1 (rows that do not see them keep no key)."""
    generator = torch.Generator().manual_seed(2)
    keep = torch.rand(2, layout.seq_len, generator=generator) > 0.3
    keep[1, : layout.seq_len // 2] = False
    bias = torch.randn(2, layout.seq_len, generator=generator).masked_fill(~keep, -torch.inf)
    tail = torch.ones(2, layout.seq_len, dtype=torch.bool)
    tail[1, :-3] = False
    return {"none": None, "bool": keep, "additive": bias, "tail": tail}


MASK_KINDS = ["none", "bool", "additive", "tail"]


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("layout", PORTABLE_LAYOUTS, ids=PORTABLE_IDS)
def test_portable_attention_equals_the_reference(layout, mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 8) for _ in range(3))
    mask = key_masks_for(layout)[mask_kind]
    tables = PortableTables.from_layout(layout)
    bias = None if mask is None else t4dopt.ops.key_mask.as_bias(mask, 2, torch.float32)
    got = portable_attention(q, k, v, tables.pad_index, tables.kv_blocks, tables.key_bias, tables.slot_bias,
                             tables.output_index, tables.row_keep, 0.3, bias)
    expected = dense_masked_attention(q, k, v, layout.token_mask(), 0.3, key_mask=mask)
    assert not got.isnan().any()
    if mask_kind == "tail" and layout is PORTABLE_LAYOUTS[1]:
        empty = ~(layout.token_mask() & mask[:, None, :]).any(dim=-1)   # [B, N]: rows left with no key
        assert empty[1].sum() > empty[0].sum() and bool((got[1][:, empty[1]] == 0).all())
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, t4dopt.block_sparse_attention(q, k, v, layout, scale=0.3, key_mask=mask),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("layout", PORTABLE_LAYOUTS, ids=PORTABLE_IDS)
def test_onnxruntime_plugin_compute_equals_the_reference(layout, mask_kind):
    needs_extensions()
    from t4dopt.plugins.onnxruntime_ops import block_sparse_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 8) for _ in range(3))
    mask = key_masks_for(layout)[mask_kind]
    bias = None if mask is None else t4dopt.ops.key_mask.as_bias(mask, 2, torch.float32).numpy()
    got = block_sparse_attention(q.numpy(), k.numpy(), v.numpy(), *(t.numpy() for t in layout.tensors()), 0.3, bias)
    expected = dense_masked_attention(q, k, v, layout.token_mask(), 0.3, key_mask=mask)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_onnxruntime_plugin_spells_the_domain_as_the_exporter_does():
    needs_extensions()
    from t4dopt.ops import schema
    from t4dopt.plugins import onnxruntime_ops

    assert (onnxruntime_ops.ONNX_DOMAIN, onnxruntime_ops.ONNX_OP_TYPE, onnxruntime_ops.ONNX_MASKED_OP_TYPE) == (
        schema.ONNX_DOMAIN, schema.ONNX_OP_TYPE, schema.ONNX_MASKED_OP_TYPE)


def test_bad_ops_value_names_the_option_and_the_allowed_values(tmp_path):
    with pytest.raises(t4dopt.T4DOptionError, match=r"ops='tensorrt'.*'custom', 'portable'"):
        export_onnx(torch.nn.Linear(2, 2), (torch.randn(1, 2),), tmp_path / "x.onnx", ops="tensorrt")


def test_model_with_a_graph_break_is_unsupported(tmp_path):
    class Breaks(torch.nn.Module):
        def forward(self, x):
            x = x + 1
            torch._dynamo.graph_break()
            return x * 2

    with pytest.raises(t4dopt.T4DUnsupportedError, match="could not be captured as one graph"):
        export_onnx(Breaks(), (torch.randn(2, 3),), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_command_prints_progress_and_summary(tmp_path, capsys):
    needs_extensions()
    out = tmp_path / "model.onnx"
    assert main(["export", "--format", "onnx", "--out", str(out), "--tokens-per-frame", "40", "--block-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "capturing Sculpt4DDiT" in printed and "exporting to ONNX" in printed
    assert "6 found, 2 rewritten to block-sparse" in printed and "MiB" in printed
    assert "max |ort - eager|" in printed and "within 1e-04" in printed
    assert out.exists()
