"""Deployment bundles: export, load without the model, the sampling loop with its cache, malformed bundles."""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import t4dopt
from support import NoResidual
from t4dopt import deploy
from t4dopt.export import export_bundle
from t4dopt.models.pretrained import pretrained
from t4dopt.models.sampler import sample_flow_matching

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

STEPS = 8
OPTIONS = {"layout": {"frames": 8, "views": 4, "tokens_per_frame": 64}, "cache": {"threshold": 0.1, "steps": STEPS}}


@pytest.fixture(scope="module")
def scm():
    return pretrained("scm-tiny").eval()


@pytest.fixture(scope="module")
def inputs(scm):
    generator = torch.Generator().manual_seed(0)
    config = scm.config
    return (torch.randn(1, 4, 8, 64, config.in_channels, generator=generator),
            torch.randn(1, config.cond_tokens, config.cond_dim, generator=generator))


@pytest.fixture(scope="module")
def bundle(scm, inputs, tmp_path_factory):
    noise, cond = inputs
    path = tmp_path_factory.mktemp("bundle") / "scm"
    result = export_bundle(scm, (noise, torch.ones(1), cond), path, options=OPTIONS)
    assert (result.segments, result.units, result.chains) == (13, 10, 2)
    return path


def test_manifest_records_program_cache_layout_and_versions(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["cache"]["threshold"] == 0.1 and manifest["cache"]["steps"] == STEPS
    assert manifest["layout"]["views"] == 4
    assert [u["name"] for u in manifest["program"]["units"]][:3] == ["blocks.0.spatial", "blocks.0.camera", "blocks.0.motion"]
    assert manifest["program"]["chains"] == [[0, 1, 2], [5, 6, 7]]
    assert [(i["name"], i["dtype"], i["device"]) for i in manifest["inputs"]] == [
        ("x", "float32", "cpu"), ("t", "float32", "cpu"), ("cond", "float32", "cpu")]
    assert manifest["format"] == 2 and manifest["integrity"]["algorithm"] == "sha256"
    for files in manifest["artifacts"]:
        for name in files.values():
            digest = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
            assert manifest["integrity"]["files"][name] == digest
    program = json.dumps(manifest["program"], sort_keys=True, separators=(",", ":")).encode()
    assert manifest["integrity"]["fields"]["program"] == hashlib.sha256(program).hexdigest()


def test_sampling_loop_over_the_bundle_equals_the_compiled_model(scm, inputs, bundle):
    noise, cond = inputs
    loaded = deploy.load(bundle)
    got = loaded.sample(noise, cond)
    compiled = torch.compile(scm, backend="turbo4d", options={**OPTIONS, "target": "eager"})
    with torch.no_grad():
        expected = sample_flow_matching(compiled, noise, cond, steps=STEPS)
    assert torch.allclose(got, expected, atol=1e-5)
    assert "bypassed" in loaded.cache_table()
    assert sum(u.reused + u.bypassed + u.pruned for u in loaded.runtime.stats.report()) > 0
    assert torch.equal(loaded.sample(noise, cond), got)


def test_bundle_runs_in_a_fresh_process(inputs, bundle, tmp_path):
    noise, cond = inputs
    torch.save((noise, cond), tmp_path / "inputs.pt")
    script = ("import sys, torch\nfrom t4dopt import deploy\n"
              "noise, cond = torch.load(sys.argv[2])\n"
              "torch.save(deploy.load(sys.argv[1]).sample(noise, cond), sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(bundle), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   check=True, timeout=300)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), deploy.load(bundle).sample(noise, cond), atol=1e-6)


def test_inputs_of_another_shape_dtype_or_type_are_refused_naming_the_input(inputs, bundle):
    noise, cond = inputs
    loaded = deploy.load(bundle)
    with pytest.raises(t4dopt.T4DInputError, match=r"'x' must have shape \[1, 4, 8, 64, 12\].*got \[1, 4, 4, 64, 12\]"):
        loaded(torch.randn(1, 4, 4, 64, 12), torch.ones(1), cond)
    with pytest.raises(t4dopt.T4DInputError, match=r"'x' must have dtype float32.*got float64"):
        loaded(noise.double(), torch.ones(1), cond)
    with pytest.raises(t4dopt.T4DInputError, match=r"'cond' must have dtype float32.*got bfloat16"):
        loaded(noise, torch.ones(1), cond.bfloat16())
    with pytest.raises(t4dopt.T4DInputError, match=r"'t' must be a tensor, got float"):
        loaded(noise, 0.5, cond)
    with pytest.raises(TypeError, match="takes 3 inputs \\(x, t, cond\\), got 1"):
        loaded(torch.randn(1))
    assert isinstance(t4dopt.T4DInputError("x"), ValueError)


def _copy(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


def _edit(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _set(*path_and_value):
    """An edit of the manifest: set the field at ``path`` (keys and indices) to ``value``."""
    *path, last, value = path_and_value

    def change(manifest):
        target = manifest
        for key in path:
            target = target[key]
        target[last] = value
    return change


def _swap_artifacts(manifest):
    first, second = manifest["artifacts"][1], manifest["artifacts"][2]
    first["plain"], second["plain"] = second["plain"], first["plain"]


def _swap_files(folder, first, second):
    (folder / first).rename(folder / "swap")
    (folder / second).rename(folder / first)
    (folder / "swap").rename(folder / second)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


MALFORMED = [
    # the folder and the manifest file
    (lambda folder: (folder / "manifest.json").unlink(), "has no manifest.json"),
    (lambda folder: (folder / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda folder: (folder / "manifest.json").write_text("[1, 2]"), "holds list, not a manifest object"),
    (lambda folder: (folder / "segment004.pt2").unlink(), "segment004.pt2 is missing"),
    # the schema: every field, named
    (lambda folder: _edit(folder, _set("format", 99)), "format 99"),
    (lambda folder: _edit(folder, _set("format", "2")), "format '2'"),
    (lambda folder: _edit(folder, _set("format", True)), "format True"),
    (lambda folder: _edit(folder, lambda m: m.pop("program")), "lacks program"),
    (lambda folder: _edit(folder, lambda m: m.pop("integrity")), "field integrity: missing"),
    (lambda folder: _edit(folder, _set("notes", "mine")), "field notes: unknown field"),
    (lambda folder: _edit(folder, _set("cache", "speed", 2)), "field cache.speed: unknown cache setting"),
    (lambda folder: _edit(folder, _set("cache", "threshold", -1)), "field cache.threshold: -1 is not valid"),
    (lambda folder: _edit(folder, _set("cache", "threshold", float("nan"))), "field cache.threshold: nan"),
    (lambda folder: _edit(folder, _set("cache", "threshold", "0.1")), "field cache.threshold: '0.1'"),
    (lambda folder: _edit(folder, _set("cache", "levels", ["block", "frame"])), "field cache.levels"),
    (lambda folder: _edit(folder, _set("cache", "levels", [])), "field cache.levels: \\[\\] is not valid"),
    (lambda folder: _edit(folder, _set("cache", "steps", 0)), "field cache.steps: 0"),
    (lambda folder: _edit(folder, _set("cache", "order", 5)), "field cache.order: 5"),
    (lambda folder: _edit(folder, _set("cache", "order", 1.0)), "field cache.order: 1.0"),
    (lambda folder: _edit(folder, _set("cache", "token_ratio", 7)), "field cache.token_ratio: 7"),
    (lambda folder: _edit(folder, _set("cache", "max_reuse", 0)), "field cache.max_reuse: 0"),
    (lambda folder: _edit(folder, _set("cache", "warmup", -1)), "field cache.warmup: -1"),
    (lambda folder: _edit(folder, _set("versions", "t4dopt", "9.0.0")), "field versions.t4dopt: written by t4dopt 9.0.0"),
    (lambda folder: _edit(folder, _set("versions", "torch", "banana")), "field versions.torch: 'banana' is not a version"),
    (lambda folder: _edit(folder, _set("versions", {"t4dopt": "0.1.0"})), "field versions: expected"),
    (lambda folder: _edit(folder, _set("inputs", 0, "dtype", "float33")), "field inputs\\[0\\]: dtype='float33'"),
    (lambda folder: _edit(folder, _set("inputs", 1, "shape", [-1])), "field inputs\\[1\\]: shape=\\[-1\\]"),
    (lambda folder: _edit(folder, _set("inputs", 2, "name", "x")), "field inputs: input names repeat"),
    (lambda folder: _edit(folder, lambda m: m["artifacts"].pop()), "artifacts for 13 segments"),
    (lambda folder: _edit(folder, _set("artifacts", 3, "full", "../elsewhere.pt2")), "field artifacts\\[3\\].full"),
    (lambda folder: _edit(folder, lambda m: m["artifacts"][3].pop("pruned")), "field artifacts\\[3\\]"),
    (lambda folder: _edit(folder, _set("program", "chains", [[0, 1, 2], [2, 3]])), "field program.chains\\[1\\]"),
    (lambda folder: _edit(folder, _set("program", "chains", [[0, 99]])), "field program.chains\\[0\\]"),
    (lambda folder: _edit(folder, _set("program", "timestep", "nothing")), "field program.timestep"),
    (lambda folder: _edit(folder, _set("program", "segments", 1, "inputs", 0, "ghost")),
     "field program.segments\\[1\\].inputs: 'ghost' is not computed"),
    (lambda folder: _edit(folder, _set("program", "segments", 2, "unit", 40)), "field program.segments\\[2\\].unit"),
    (lambda folder: _edit(folder, _set("program", "units", 1, "token_share", 7)),
     "field program.units\\[1\\].token_share: 7"),
    (lambda folder: _edit(folder, _set("program", "units", 0, "flops", -1)), "field program.units\\[0\\].flops"),
    # the integrity record: edits that pass the schema, swapped and damaged files
    (lambda folder: _edit(folder, _set("program", "chains", [[0, 1], [5, 6, 7]])), "field 'program' differs"),
    (lambda folder: _edit(folder, _set("program", "units", 0, "exit", "add_6")), "field 'program' differs"),
    (lambda folder: _edit(folder, _swap_artifacts), "field 'artifacts' differs"),
    (lambda folder: _edit(folder, _set("inputs", 0, "shape", [1, 4, 8, 64, 13])), "field 'inputs' differs"),
    (lambda folder: _edit(folder, _set("versions", "torch", "2.13.9")), "field 'versions' differs"),
    (lambda folder: _edit(folder, _set("cache", "threshold", 0.2)), "field 'cache' differs.*pass cache="),
    (lambda folder: _edit(folder, _set("layout", "frames", 4)), "field 'layout' differs"),
    (lambda folder: _edit(folder, _set("integrity", "fields", "program", "0" * 64)), "field 'program' differs"),
    (lambda folder: _swap_files(folder, "segment001.pt2", "segment002.pt2"), "segment001.pt2 is not the file exported"),
    (lambda folder: _truncate(folder / "segment003.pruned.pt2"), "damaged: segment003.pruned.pt2"),
    (lambda folder: _flip_a_byte(folder / "segment000.pt2"), "damaged: segment000.pt2"),
]


@pytest.mark.parametrize("damage, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_edited_or_damaged_bundles_fail_with_clear_errors(bundle, tmp_path, damage, message):
    folder = _copy(bundle, tmp_path)
    damage(folder)
    with pytest.raises(deploy.BundleError, match=message):
        deploy.load(folder)


def test_bundle_errors_name_the_field_and_the_file(bundle, tmp_path):
    folder = _copy(bundle, tmp_path)
    _edit(folder, _set("cache", "order", 5))
    with pytest.raises(deploy.BundleError) as error:
        deploy.load(folder)
    assert (error.value.field, error.value.path) == ("cache.order", str(folder / "manifest.json"))
    _copy_back = _copy(bundle, tmp_path / "again")
    _truncate(_copy_back / "segment002.pt2")
    with pytest.raises(deploy.BundleError) as error:
        deploy.load(_copy_back)
    assert error.value.path == str(_copy_back / "segment002.pt2")


def _as_format_1(manifest):
    """What t4dopt wrote before the integrity record: format 1, no record, a ``token`` flag per segment (unused)."""
    manifest["format"] = 1
    del manifest["integrity"]
    for segment, files in zip(manifest["program"]["segments"], manifest["artifacts"]):
        segment["token"] = bool(files.get("full"))


def test_manifests_of_earlier_versions_still_load(inputs, bundle, tmp_path):
    """Format 1 bundles load and run the same, with a warning that their files are not checked."""
    noise, cond = inputs
    folder = _copy(bundle, tmp_path)
    _edit(folder, _as_format_1)
    with pytest.warns(t4dopt.T4DWarning, match="format 1.*not checked"):
        loaded = deploy.load(folder)
    assert torch.equal(loaded.sample(noise, cond), deploy.load(bundle).sample(noise, cond))


@pytest.mark.parametrize("damage", [_truncate, lambda path: path.write_bytes(b"not a zip archive")])
def test_a_damaged_file_without_an_integrity_record_is_a_bundle_error(bundle, tmp_path, damage):
    """Without hashes to compare (format 1), torch's own error (BadZipFile, ...) becomes a BundleError naming the file."""
    folder = _copy(bundle, tmp_path)
    _edit(folder, _as_format_1)
    damage(folder / "segment001.pt2")
    with pytest.warns(t4dopt.T4DWarning), pytest.raises(deploy.BundleError, match="segment001.pt2 could not be loaded"):
        deploy.load(folder)


def test_another_cache_schedule_is_passed_to_load_not_edited_in(scm, inputs, bundle):
    noise, cond = inputs
    uncached = deploy.load(bundle, cache={"threshold": 0})
    assert uncached.runtime.spec.steps == STEPS and uncached.runtime.spec.threshold == 0
    with torch.no_grad():
        expected = sample_flow_matching(scm, noise, cond, steps=STEPS)
    assert torch.allclose(uncached.sample(noise, cond), expected, atol=1e-5)
    assert sum(u.reused + u.bypassed + u.pruned for u in uncached.runtime.stats.report()) == 0
    for cache, option in [({"threshold": -1}, "cache['threshold']"), ({"order": 1.5}, "cache['order']"),
                          ({"levels": ["block"]}, "cache['levels']"), ({"token_ratio": 0.5}, "cache['token_ratio']"),
                          ({"tresh": 0.1}, "cache['tresh']"), (False, "cache=False")]:
        with pytest.raises(t4dopt.T4DOptionError, match=re.escape(option)):
            deploy.load(bundle, cache=cache)


def test_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(deploy.BundleError, match="no bundle folder"):
        deploy.load(tmp_path / "nowhere")




def test_model_without_residual_sublayers_cannot_be_bundled(tmp_path):
    with pytest.raises(t4dopt.T4DUnsupportedError, match="cannot be cut into cache segments"):
        export_bundle(NoResidual().eval(), (torch.randn(2, 16, 8),), tmp_path / "b")
