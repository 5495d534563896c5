"""The turbo4d passes on tiny random configs of diffusers' video transformers (`tests/diffusers_models.py`).

With no layout option (LTX-Video: the option its packed latents need, named), every joint self-attention
over the whole video must be found, read with the grid the model's config and input shapes give (prefix
text, frames x tokens per frame, suffix text), made sparse, and the compiled model must equal the same
model run eagerly with its joint attentions computed by plain SDPA under the explicit boolean mask of the
policy (built token by token in `tests/reference.py`, independently of t4dopt), the model's own mask kept.
Models without joint attention (Latte, SanaVideo) must come out unchanged.
"""

import re
import warnings

import pytest

pytest.importorskip("diffusers")

import torch

import diffusers_coverage as coverage
import diffusers_models as dm
import t4dopt
from diffusers_coverage import POLICY
from t4dopt.report import collecting

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

def _options(tiny: dm.TinyModel, layout=None, **extra):
    options = {"sparse": POLICY, "target": "eager", **extra}
    if layout is not None or tiny.hint is not None:
        options["layout"] = layout if layout is not None else tiny.hint
    return options


def _compiled(tiny: dm.TinyModel, options: dict):
    compiled = torch.compile(tiny.model, backend="turbo4d", options=options)
    with torch.no_grad(), collecting() as report, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(**tiny.inputs, return_dict=False)[0]
    return out, report, [w for w in caught if issubclass(w.category, t4dopt.T4DWarning)]


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


JOINT_MODELS = [dm.cogvideox, dm.cogvideox_15, dm.wan21, dm.wan22, dm.wan_vace, dm.skyreels_v2, dm.skyreels_v2_df,
                dm.hunyuan_video, dm.hunyuan_video_padded, dm.hunyuan_video_15, dm.hunyuan_video_15_padded,
                dm.motif_video, dm.mochi, dm.ltx_video, dm.allegro, dm.easyanimate, dm.cosmos, dm.consisid]


@pytest.mark.parametrize("make", JOINT_MODELS, ids=[m.__name__ for m in JOINT_MODELS])
def test_every_joint_attention_is_sparse_with_no_layout_option_and_equals_the_explicit_mask(make):
    # One compile per model, shared with the README's coverage table (tests/test_diffusers_coverage.py).
    measured = coverage.measure(make)
    tiny, report = measured.tiny, measured.report
    mask = coverage.token_mask(tiny)
    assert mask.shape[0] == tiny.length and mask.float().mean() < 0.8
    joint = [s for s in report.sites if s.kind == "spatiotemporal"]
    assert len(joint) == (tiny.graph_sites or tiny.joint_sites), report.table()
    assert all(s.action == "sparse" for s in joint), report.table()
    assert all(s.shape[-2] == tiny.length for s in joint)
    policy_density = float(mask.float().mean())
    if make is dm.skyreels_v2_df:  # the model's block-causal mask is intersected with the policy: sparser still
        assert all(s.density < policy_density - 0.1 for s in joint)
    else:
        assert all(s.density == pytest.approx(policy_density, abs=1e-6) for s in joint)
    assert not measured.warned, measured.warned
    assert measured.masked_calls == tiny.joint_sites, "the reference must mask every joint attention"
    if tiny.traceable:  # compiled after make_traceable on a copy; the reference ran diffusers' own processor
        assert {type(b.attn1.processor).__name__ for b in tiny.model.transformer_blocks} == {"MochiAttnProcessor2_0"}
    assert _relative(measured.got, measured.want) < 1e-4
    assert _relative(measured.got, measured.dense) > 1e-3, "the mask must change the output, or this test proves nothing"
    if tiny.key_padding is not None:  # and the model's own key mask must matter too
        unpadded = {**tiny.inputs, "encoder_attention_mask": torch.ones_like(tiny.inputs["encoder_attention_mask"])}
        with torch.no_grad(), coverage.masked_joint_sdpa(tiny.length, mask):
            assert _relative(tiny.model(**unpadded, return_dict=False)[0], measured.want) > 1e-3


@pytest.mark.parametrize("make", [dm.latte, dm.sana_video], ids=["latte", "sana_video"])
def test_models_without_joint_attention_are_unchanged(make):
    measured = coverage.measure(make)
    report = measured.report
    assert report.sites and not any(s.action == "sparse" for s in report.sites)
    assert not measured.warned, measured.warned
    torch.testing.assert_close(measured.got, measured.dense, rtol=1e-5, atol=1e-6)


def test_latte_reads_spatial_and_temporal_blocks_from_its_patch_embedding():
    tiny = dm.latte()
    _, report, _ = _compiled(tiny, _options(tiny))
    assert [(s.name, s.kind) for s in report.sites] == [
        ("transformer_blocks.0.attn1", "spatial"), ("transformer_blocks.0.attn2", "cross"),
        ("temporal_transformer_blocks.0.attn1", "temporal")]


def test_ltx_without_its_hint_stays_dense_and_names_the_option_it_needs():
    tiny = dm.ltx_video()
    tiny.hint = None
    got, report, warned = _compiled(tiny, _options(tiny))
    joint = [s for s in report.sites if s.shape[-2] == tiny.length and s.kind != "cross"]
    assert len(joint) == 2 and all(s.action == "dense" for s in joint)
    assert "{'frames': 3, 'height': 8, 'width': 6}" in joint[0].evidence and "packed" in joint[0].evidence
    assert len(warned) == 2


def test_a_layout_option_that_contradicts_the_graph_is_not_trusted():
    tiny = dm.cogvideox()
    # 6 + 10 x 32 = 326 tokens as well, but the patch embedding shows 5 frames x 64 tokens.
    _, report, warned = _compiled(tiny, _options(tiny, {"frames": 10, "tokens_per_frame": 32}, trust_layout=True))
    assert [s.kind for s in report.sites] == ["unknown"] * 2
    assert "the graph shows 5 frames x 64 tokens" in report.sites[0].evidence and len(warned) == 2
    tiny = dm.wan21()
    _, report, _ = _compiled(tiny, _options(tiny, {"frames": 10, "tokens_per_frame": 24}))
    assert [s.kind for s in report.sites] == ["unknown", "cross"] * 2
    _, report, _ = _compiled(tiny, _options(tiny, {"frames": 5, "tokens_per_frame": 48, "prefix_tokens": 3}))
    assert "prefix_tokens=3" in report.sites[0].evidence


def test_a_right_layout_option_agrees_with_the_graph():
    tiny = dm.cogvideox()
    _, report, warned = _compiled(tiny, _options(tiny, {"frames": 5, "height": 8, "width": 8, "prefix_tokens": 6}))
    assert [(s.kind, s.action) for s in report.sites] == [("spatiotemporal", "sparse")] * 2 and not warned
    assert [s.name for s in report.sites] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]


def test_sparse_none_is_a_passthrough():
    tiny = dm.wan21()
    got, report, warned = _compiled(tiny, {"sparse": None, "target": "eager"})
    assert not warned and report.sites
    with torch.no_grad():
        want = tiny.model(**tiny.inputs, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_graph_break_that_hides_an_attention_is_named_with_its_line_and_a_way_out():
    # Mochi, as diffusers builds it, keeps the valid text tokens with torch.nonzero inside its attention: dynamo
    # breaks the graph there and the whole attention runs outside the compiled graphs. The break lies in the
    # processor make_traceable replaces, so the way out named is that call.
    tiny = dm.mochi()
    with pytest.warns(t4dopt.T4DWarning, match="not in the compiled graph") as caught:
        report = t4dopt.explain(tiny.model, **tiny.inputs, options=_options(tiny))
    hidden = [s for s in report.sites if s.evidence == "graph break"]
    assert [s.name for s in hidden] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    for site in hidden:
        assert site.action == "dense" and "attention_processor.py:" in site.reason and "nonzero" in site.reason
        assert "t4dopt.make_traceable(model)" in site.reason and "capture_dynamic_output_shape_ops" not in site.reason
    assert sum("not in the compiled graph" in str(w.message) for w in caught) == 2
    assert report.graphs > 2 and all(not s.name.startswith("g") for s in report.sites)


def test_sites_of_graphs_cut_out_of_the_model_keep_their_module_path():
    # HunyuanVideo 1.5 breaks at `if is_t2v:` (a tensor condition): its blocks compile as graphs of their own.
    tiny = dm.hunyuan_video_15()
    report = t4dopt.explain(tiny.model, **tiny.inputs, options=_options(tiny))
    assert report.graphs >= 2
    joint = [s for s in report.sites if s.shape and s.shape[-2] == 157]
    assert joint and joint[0].graph >= 1 and joint[0].name == "transformer_blocks.0.attn"


# The README's coverage table: `python tests/diffusers_coverage.py --write` regenerates it when a row moves.

ERROR_COLUMN = coverage.HEADER.strip("|").split("|").index(" error vs explicit mask ")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _within(measured: float, stated: str) -> bool:
    match = re.fullmatch(r"< 1e(-?\d+)", stated)
    return match is not None and measured < 10.0 ** int(match.group(1))


def test_the_readme_table_is_the_measured_one():
    rows = [coverage.measure(make).row for make in coverage.MODELS]
    stated = coverage.readme_table(coverage.README.read_text()).splitlines()
    rendered = coverage.render(rows).splitlines()
    hint = "the README's coverage table is stale: run `python tests/diffusers_coverage.py --write`"
    assert len(stated) == len(rendered), hint
    assert stated[:2] == rendered[:2], hint
    for row, line, fresh in zip(rows, stated[2:], rendered[2:]):
        cells, want = _cells(line), _cells(fresh)
        # The error column states a bound; a rerun measuring a slightly different error stays within it.
        assert _within(row.error, cells[ERROR_COLUMN]), f"{row.model}: error {row.error:.2e} > {cells[ERROR_COLUMN]}"
        del cells[ERROR_COLUMN], want[ERROR_COLUMN]
        assert cells == want, f"{row.model}: {hint}"


def test_every_model_has_the_cache_units_its_blocks_have_and_says_why_it_left_out_the_rest():
    """`TinyModel.cache_units`: Wan's RoPE self-attention (writes into fresh buffers made values), two-stream
    blocks (CogVideoX, HunyuanVideo, EasyAnimate, ConsisID: packed) and Cosmos's blocks are units."""
    for make in coverage.MODELS:
        measured = coverage.measure(make)
        graphs = measured.found
        cached = [unit.name for graph in graphs if not graph.reason for unit in graph.units]
        assert len(cached) == measured.tiny.cache_units == measured.row.units, (measured.tiny.name, graphs)
        assert graphs and all(graph.reason or graph.units for graph in graphs), measured.tiny.name
        assert all(left.reason for graph in graphs for left in graph.left_out), measured.tiny.name


def test_every_sparse_row_is_close_to_its_reference():
    for make in coverage.MODELS:
        row = coverage.measure(make).row
        assert row.error < 1e-4, row
        assert row.sparse in (0, row.joint), row
