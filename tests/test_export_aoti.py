import zipfile

import pytest
import torch

if not hasattr(torch._inductor, "aoti_compile_and_package"):
    pytest.skip("this torch has no torch._inductor.aoti_compile_and_package (AOTInductor packaging)",
                allow_module_level=True)

from t4dopt.cli import build_parser  # noqa: E402
from t4dopt.errors import T4DInputError  # noqa: E402
from t4dopt.export import aoti, load_aoti  # noqa: E402
from t4dopt.export.aoti_export import run_in_fresh_process  # noqa: E402
from t4dopt.models import Sculpt4DDiT, make_inputs  # noqa: E402

pytestmark = [pytest.mark.inductor, pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")]

TOLERANCE = 1e-4
TINY_OPTIONS = {"layout": {"frames": 4, "tokens_per_frame": 40}, "sparse": {"policy": "sculpt4d", "block_size": 16}}


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    torch.manual_seed(0)
    model = Sculpt4DDiT("tiny", tokens_per_frame=40).eval()   # 40 tokens: blocks of 16, 16 and 8
    noise, cond = make_inputs(model.config)
    args = (noise, torch.full((1,), 0.5), cond)
    with torch.no_grad():
        expected = torch.compile(model, backend="turbo4d", options={**TINY_OPTIONS, "target": "eager"})(*args)
    result = aoti(model, args, tmp_path_factory.mktemp("aoti") / "tiny.pt2", options=TINY_OPTIONS)
    return result, args, expected


def test_export_keeps_each_rewritten_site_as_one_t4d_node(tiny_package):
    result, _, _ = tiny_package
    assert result.sites_rewritten == 2 and len(result.sites) == 6
    assert result.t4d_nodes == 2
    assert result.path.suffix == ".pt2" and result.file_bytes == result.path.stat().st_size > 0


def test_package_calls_the_t4d_op_through_the_proxy_executor(tiny_package):
    result, _, _ = tiny_package
    with zipfile.ZipFile(result.path) as package:
        calls = [package.read(name).decode().count('"t4d::block_sparse_attention"')
                 for name in package.namelist() if name.endswith(".wrapper.json")]
    assert calls == [2]


def test_package_runs_in_a_fresh_process_and_matches_eager(tiny_package):
    result, args, expected = tiny_package
    got = run_in_fresh_process(result.path, args)   # a new python: torch.save'd inputs, load_aoti, run
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= TOLERANCE


def test_package_records_the_inputs_it_was_exported_with(tiny_package):
    result, args, _ = tiny_package
    package = load_aoti(result.path)   # loaded, never run here (see load_aoti on running in the exporting process)
    assert [(s.name, list(s.shape), s.dtype, s.device) for s in package.inputs] == [
        (name, list(a.shape), "float32", "cpu") for name, a in zip(("x", "t", "cond"), args)]


@pytest.mark.parametrize("change", [
    lambda args: ((args[0][:, :2], *args[1:]), r"'x' must have shape \[1, 4, 40, 8\] .*got \[1, 2, 40, 8\]"),
    lambda args: ((args[0][:, :, :24], *args[1:]), r"'x' must have shape \[1, 4, 40, 8\] .*got \[1, 4, 24, 8\]"),
    lambda args: ((args[0], args[1], torch.cat([args[2], args[2]], 1)), r"'cond' must have shape"),
    lambda args: ((args[0].double(), *args[1:]), r"'x' must have dtype float32 .*got float64"),
    lambda args: ((args[0], args[1].half(), args[2]), r"'t' must have dtype float32 .*got float16"),
    lambda args: ((args[0], 0.5, args[2]), r"'t' must be a tensor, got float"),
])
def test_package_refuses_inputs_it_was_not_exported_for_naming_the_input(tiny_package, change):
    """Without the check a package given another shape returns a tensor of the exported shape, silently."""
    result, args, _ = tiny_package
    wrong, message = change(args)
    with pytest.raises(T4DInputError, match=message):
        load_aoti(result.path)(*wrong)


def test_package_refuses_another_number_of_inputs(tiny_package):
    result, args, _ = tiny_package
    with pytest.raises(TypeError, match=r"takes 3 inputs \(x, t, cond\), got 2"):
        load_aoti(result.path)(*args[:2])


def test_suffix_tokens_and_a_key_mask_through_a_package(tmp_path):
    """[video, text] with a text-padding mask through AOTInductor's proxy executor (the op's optional
    key_mask argument), run in a fresh process, against the float64 reference."""
    from support import OpAttention
    from t4dopt import masks

    layout = masks.sculpt4d(3, 24, block_size=16, suffix_tokens=9)
    model = OpAttention(layout).eval()
    x = torch.randn(2, layout.seq_len, 32)
    keep = torch.arange(layout.seq_len) < torch.tensor([[layout.seq_len], [layout.seq_len - 6]])
    result = aoti(model, (x, keep), tmp_path / "masked.pt2")
    assert result.t4d_nodes == 1
    got = run_in_fresh_process(result.path, (x, keep))
    with torch.no_grad():
        expected = model.reference(x, layout.token_mask(), keep)
    assert float((got - expected).abs().max()) <= TOLERANCE


def test_export_command_offers_aoti_with_a_pt2_default():
    args = build_parser().parse_args(["export", "--format", "aoti"])
    assert args.format == "aoti" and args.out is None
