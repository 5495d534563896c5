"""TensorRT export: the plugin, its converter and the engine builder.

TensorRT cannot be installed where these tests were written, so most of them check what runs
without it: packing the block table into the plugin's plan tensors (against the ONNX the custom
export writes), the ONNX rewrite for TensorRT's parser, the launch grid and the supported inputs,
the plugin's Triton kernel compiled to PTX for sm_90 (no GPU needed) and run in Triton's
interpreter against the op, and the errors without tensorrt or CUDA. The tests at the end build
and run real engines; they skip without tensorrt (or torch-tensorrt) and a CUDA GPU.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

# torch.onnx's exporter trips over its own pytree deprecation; nothing this package controls.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

from reference import random_qkv  # noqa: E402
from t4dopt import masks  # noqa: E402
from t4dopt.export import export_onnx  # noqa: E402
from t4dopt.export import tensorrt_export  # noqa: E402
from t4dopt.export.tensorrt_export import to_plugin_nodes  # noqa: E402
from t4dopt.models import Sculpt4DDiT, make_inputs  # noqa: E402
from t4dopt.ops import block_sparse_attention, triton_kernel  # noqa: E402
from t4dopt.ops import tables as op_tables  # noqa: E402
from t4dopt.plugins import tensorrt_converter, tensorrt_plugins as plugins  # noqa: E402

TINY_OPTIONS = {"layout": {"frames": 4, "tokens_per_frame": 40}, "sparse": {"policy": "sculpt4d", "block_size": 16}}
needs_triton = pytest.mark.skipif(triton_kernel.triton is None, reason="needs triton")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Sculpt4DDiT("tiny", tokens_per_frame=40).eval()   # 40 tokens: blocks of 16, 16 and 8
    noise, cond = make_inputs(model.config)
    return model, (noise, torch.full((1,), 0.5), cond)


@pytest.fixture(scope="module")
def custom_onnx(tiny, tmp_path_factory):
    model, args = tiny
    return export_onnx(model, args, tmp_path_factory.mktemp("trt") / "tiny.onnx", options=TINY_OPTIONS).path


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ------------------------------------------------------------------------ tables and ONNX rewrite

@pytest.mark.parametrize("prefix, suffix", [(7, 0), (0, 21), (7, 21)])
def test_packed_tables_are_the_plan_the_op_runs(prefix, suffix):
    layout = masks.sculpt4d(4, 40, block_size=16, prefix_tokens=prefix, suffix_tokens=suffix)
    tables = plugins.pack_tables(*layout.tensors("cpu"))
    expected = op_tables.decode(*layout.tensors("cpu")).triton_plan(torch.device("cpu"))
    plan = tables.plan()
    assert (plan.block_m, plan.block_n, plan.seq_len) == (expected.block_m, expected.block_n, layout.seq_len)
    for field in ("tiles", "full_starts", "partial_starts", "partial_ends"):
        assert torch.equal(getattr(plan, field), getattr(expected, field)), field
    assert all(a.dtype == np.int32 and a.flags.c_contiguous for a in tables.arrays().values())
    assert list(tables.arrays()) == list(plugins.TENSOR_INPUTS[3:])


def test_pack_tables_rejects_a_bad_table():
    counts, indices, starts = masks.sculpt4d(2, 32, block_size=16).tensors("cpu")
    with pytest.raises(ValueError, match="kv_indices"):
        plugins.pack_tables(counts, indices + 100, starts)


def test_onnx_rewrite_round_trips_the_custom_nodes(custom_onnx):
    original = onnx.load(str(custom_onnx))
    t4d_nodes = [n for n in original.graph.node if n.domain == "t4d"]
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    model = onnx.load(str(custom_onnx))
    assert to_plugin_nodes(model, aot=True) == len(t4d_nodes) == 2

    assert not [n for n in model.graph.node if n.domain == "t4d"]
    plugin_nodes = [n for n in model.graph.node if n.op_type == plugins.PLUGIN_NAME]
    rewritten = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for before, after in zip(t4d_nodes, plugin_nodes):
        old, new = _attributes(before), _attributes(after)
        assert new["plugin_namespace"] == b"t4d" and new["plugin_version"] == b"1" and new["aot"] == 1
        assert new["block_size"] == old["block_size"] == 16 and new["layout"] == old["layout"]
        assert math.isclose(new["scale"], old["scale"], rel_tol=1e-7)
        assert list(after.input[:3]) == list(before.input[:3]) and after.output[0] == before.output[0]
        assert len(after.output) == 2
        # The plan inputs unpack to the plan the op builds from the node's own table initializers.
        table = [initializers[name] for name in before.input[3:]]
        expected = plugins.pack_tables(*table)
        assert (new["block_m"], new["block_n"]) == (expected.block_m, expected.block_n)
        for name, (field, array) in zip(after.input[3:], expected.arrays().items()):
            np.testing.assert_array_equal(rewritten[name], array, err_msg=field)
    # The tables the t4d nodes read are gone; nothing unread is left behind.
    used = {name for node in model.graph.node for name in node.input}
    assert set(rewritten) <= used


SUFFIX_LAYOUT = masks.sculpt4d(3, 24, block_size=16, suffix_tokens=9)


def _op_attention_onnx(tmp_path, masked):
    from support import OpAttention
    from t4dopt.export import custom_domain

    x = torch.randn(2, SUFFIX_LAYOUT.seq_len, 32)
    keep = torch.ones(2, SUFFIX_LAYOUT.seq_len, dtype=torch.bool)
    keep[1, -4:] = False
    args = (x, keep) if masked else (x,)
    path = export_onnx(OpAttention(SUFFIX_LAYOUT).eval(), args, tmp_path / "op.onnx").path
    from onnxscript import ir

    program = ir.load(str(path))   # (the model calls the op itself: describe its layout as a site's would be)
    custom_domain.annotate_layouts(program, [SUFFIX_LAYOUT])
    return ir.serde.serialize_model(program)


def test_onnx_rewrite_keeps_the_layout_with_suffix_tokens(tmp_path):
    model = _op_attention_onnx(tmp_path, masked=False)
    assert to_plugin_nodes(model) == 1
    node = next(n for n in model.graph.node if n.op_type == plugins.PLUGIN_NAME)
    layout = _attributes(node)["layout"].decode()
    assert layout == SUFFIX_LAYOUT.describe() and "suffix_tokens=9" in layout
    expected = plugins.pack_tables(*SUFFIX_LAYOUT.tensors("cpu"))
    assert (_attributes(node)["block_m"], _attributes(node)["block_n"]) == (expected.block_m, expected.block_n)


def test_onnx_rewrite_refuses_key_masks_naming_the_limitation(tmp_path):
    model = _op_attention_onnx(tmp_path, masked=True)
    before = onnx.helper.printable_graph(model.graph)
    with pytest.raises(ValueError, match=r"MaskedBlockSparseAttention.*key mask.*TensorRT plugin does not take"):
        to_plugin_nodes(model)
    assert onnx.helper.printable_graph(model.graph) == before


def test_converter_leaves_key_masked_nodes_in_pytorch():
    from support import OpAttention
    from t4dopt.export.capture import capture_for_export

    x = torch.randn(2, SUFFIX_LAYOUT.seq_len, 32)
    keep = torch.ones(2, SUFFIX_LAYOUT.seq_len, dtype=torch.bool)
    for args, reason in (((x,), None), ((x, keep), "it takes a key mask, which the plugin does not")):
        gm, *_ = capture_for_export(OpAttention(SUFFIX_LAYOUT).eval(), args, None, lambda line: None)
        node = next(n for n in gm.graph.nodes if n.target is tensorrt_converter.T4D_OP)
        assert tensorrt_converter.node_supported(node) == reason


def test_onnx_rewrite_selects_the_jit_implementation(custom_onnx):
    model = onnx.load(str(custom_onnx))
    to_plugin_nodes(model, aot=False)
    assert {_attributes(n)["aot"] for n in model.graph.node if n.op_type == plugins.PLUGIN_NAME} == {0}


def test_onnx_rewrite_needs_the_table_as_initializers(custom_onnx):
    model = onnx.load(str(custom_onnx))
    node = next(n for n in model.graph.node if n.domain == "t4d")
    node.input[4] = "computed_at_run_time"
    with pytest.raises(ValueError, match="initializers"):
        to_plugin_nodes(model)


# ------------------------------------------------------------------ grid, dtypes, kernel signature

def test_launch_grid():
    assert plugins.launch_grid(12, 2, 3) == (12, 6, 1)
    with pytest.raises(ValueError, match="65535"):
        plugins.launch_grid(12, 1024, 64)
    with pytest.raises(ValueError, match="no query tiles"):
        plugins.launch_grid(0, 1, 1)


def test_supported_dtypes_head_dims_and_scale():
    assert plugins.unsupported_reason(torch.float16, 128, 128, 0.1, 16) is None
    assert plugins.unsupported_reason(torch.bfloat16, 64, 32, 0.1) is None
    assert plugins.unsupported_reason(torch.float32, 16, 16, 0.25) is None
    assert "float64" in plugins.unsupported_reason(torch.float64, 64, 64, 0.1)
    assert "head dim 48" in plugins.unsupported_reason(torch.float16, 48, 48, 0.1)
    assert "v head dim 24" in plugins.unsupported_reason(torch.float16, 32, 24, 0.1)
    assert "scale" in plugins.unsupported_reason(torch.float16, 32, 32, 0.0)
    assert "batch x heads" in plugins.unsupported_reason(torch.float16, 32, 32, 0.1, 70000)
    with pytest.raises(ValueError, match="does not run dtype torch.float64"):
        plugins.check_supported(torch.float64, 64, 64, 0.1)


def test_tensorrt_dtype_names():
    class DataType:   # the ``name`` of a tensorrt.DataType member is all the mapping reads
        def __init__(self, name):
            self.name = name

    assert plugins.torch_dtype(DataType("HALF")) is torch.float16
    assert plugins.torch_dtype(DataType("BF16")) is torch.bfloat16
    assert plugins.torch_dtype(DataType("FLOAT")) is torch.float32
    with pytest.raises(ValueError, match="INT8"):
        plugins.torch_dtype(DataType("INT8"))


@needs_triton
def test_kernel_signature_follows_tensorrts_argument_order():
    signature = plugins.kernel_signature(torch.bfloat16)
    assert list(signature) == plugins._plugin_kernel.arg_names
    runtime = [name for name, kind in signature.items() if kind != "constexpr"]
    # TensorRT passes the plugin's inputs, then (no) extra integers, then its outputs.
    assert runtime == ["Q", "K", "V", *plugins.TENSOR_INPUTS[3:], "Out", "Lse"]
    assert [signature[n] for n in runtime] == ["*bf16"] * 3 + ["*i32"] * 4 + ["*bf16", "*fp32"]
    constants = plugins.kernel_constexprs(torch.float32, heads=2, seq_len=160, head_dim=32, head_dim_v=16,
                                          block_m=16, block_n=16, scale=0.5)
    assert set(constants) == {n for n, kind in signature.items() if kind == "constexpr"}
    assert constants["PRECISION"] == "ieee" and math.isclose(constants["QK_SCALE"], 0.5 * triton_kernel.LOG2_E)


@needs_triton
def test_aot_kernel_compiles_to_ptx_for_hopper_without_a_gpu():
    kernel = plugins.compile_kernel(torch.float16, heads=2, seq_len=160, head_dim=16, head_dim_v=16,
                                    block_m=16, block_n=16, scale=0.25, arch=90)
    assert kernel.name == "_plugin_kernel" and kernel.arch == 90
    assert kernel.num_warps == triton_kernel.default_config(16, torch.float16).num_warps
    assert ".target sm_90" in kernel.ptx
    entry = re.search(r"\.entry\s+_plugin_kernel\s*\(([^)]*)\)", kernel.ptx).group(1)
    # 9 pointers (7 inputs, 2 outputs), then Triton's scratch pointers, which TensorRT leaves null.
    assert entry.count(".param .u64") >= 9 and kernel.shared_bytes >= 0


def _check_interpreted() -> None:
    """The plugin kernel (`launch_kernel`, its JIT implementation) against the op; run under TRITON_INTERPRET=1."""
    for dtype, head_dim, value_dim, suffix in ((torch.float32, 32, 16, 0), (torch.float16, 16, 16, 0),
                                               (torch.float32, 16, 16, 21)):
        layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7, suffix_tokens=suffix)
        q, k, v = random_qkv(layout, batch=2, heads=2, head_dim=head_dim, value_dim=value_dim, dtype=dtype)
        tables = plugins.pack_tables(*layout.tensors("cpu"))
        out = torch.empty(*q.shape[:3], value_dim, dtype=dtype)
        lse = torch.empty(q.shape[:3])
        plugins.launch_kernel(q, k, v, *(torch.from_numpy(a) for a in tables.arrays().values()), out, lse,
                              scale=0.3, block_m=tables.block_m, block_n=tables.block_n)
        expected = block_sparse_attention(q.float(), k.float(), v.float(), layout, scale=0.3)
        error = float((out.float() - expected).abs().max())
        assert error <= (1e-4 if dtype == torch.float32 else 2e-2), (dtype, error)
    print("interpreted plugin kernel ok")


@needs_triton
def test_plugin_kernel_in_the_triton_interpreter_matches_the_op():
    # TRITON_INTERPRET must be set before triton is imported, hence a fresh process.
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-c", "import test_export_tensorrt as t; t._check_interpreted()"],
        cwd=tests, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "interpreted plugin kernel ok" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------- clear errors

@pytest.fixture
def without(monkeypatch):
    """Make ``import name`` fail as it does where the package is not installed."""
    def hide(*names):
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setattr(plugins, "_registered", False)
        monkeypatch.setattr(tensorrt_converter, "_registered_aot", None)
    return hide


def test_register_without_tensorrt_names_the_extra(without):
    without("tensorrt", "tensorrt.plugin")
    with pytest.raises(ImportError, match=r"'tensorrt'.*pip install 't4dopt\[tensorrt\]'"):
        plugins.register()


def test_export_without_tensorrt_fails_before_exporting(without, tiny, tmp_path):
    without("tensorrt", "tensorrt.plugin")
    model, args = tiny
    with pytest.raises(ImportError, match=r"t4dopt\[tensorrt\]"):
        tensorrt_export.export_tensorrt(model, tmp_path / "tiny.engine", args, options=TINY_OPTIONS)
    assert not list(tmp_path.iterdir())


def test_converter_and_lowering_without_torch_tensorrt_name_the_extra(without):
    without("torch_tensorrt", "tensorrt", "tensorrt.plugin")
    with pytest.raises(ImportError, match=r"'torch_tensorrt'.*t4dopt\[tensorrt\]"):
        tensorrt_converter.lower_tensorrt(torch.fx.symbolic_trace(torch.nn.Identity()), [torch.zeros(1)])
    with pytest.raises(ImportError, match=r"t4dopt\[tensorrt\]"):
        tensorrt_converter.register_converter()


def test_no_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        plugins.require_cuda("t4dopt.export.tensorrt")


# ------------------------------------------------------------------ with TensorRT and a CUDA GPU

def _needs_tensorrt_and_cuda():
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [True, False], ids=["aot", "jit"])
def test_engine_matches_eager(tiny, tmp_path, aot):
    _needs_tensorrt_and_cuda()
    model, args = tiny
    result = tensorrt_export.export_tensorrt(model, tmp_path / "tiny.engine", args, options=TINY_OPTIONS, aot=aot)
    assert result.sites_rewritten == result.plugin_nodes == 2 and result.file_bytes > 0
    with torch.no_grad():
        expected = torch.compile(model, backend="turbo4d", options={**TINY_OPTIONS, "target": "eager"})(*args)
    names = [i.name for i in onnx.load(str(result.onnx_path), load_external_data=False).graph.input]
    outputs = tensorrt_export.run_engine(result.path, dict(zip(names, args)))
    output = outputs[onnx.load(str(result.onnx_path), load_external_data=False).graph.output[0].name]
    assert float((output.cpu().float() - expected).abs().max()) <= 1e-3   # TF32 matmuls in TensorRT


@pytest.mark.gpu
def test_lower_tensorrt_matches_eager(tiny):
    _needs_tensorrt_and_cuda()
    pytest.importorskip("torch_tensorrt")
    from t4dopt.export.capture import capture_rewritten
    from t4dopt.options import parse_options

    model, args = tiny
    model, args = model.cuda(), tuple(a.cuda() for a in args)
    with torch.no_grad():
        gm, _ = capture_rewritten(model, args, parse_options(TINY_OPTIONS))
        expected = gm(*args)
        compiled = tensorrt_converter.lower_tensorrt(gm, args)
        output = compiled(*args)
    output = output[0] if isinstance(output, (tuple, list)) else output
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    assert float((output - expected).abs().max()) <= 1e-3
