"""Deployment bundles: export, load without the model, the sampling loop with its cache, malformed bundles."""

import json
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
    assert [i["name"] for i in manifest["inputs"]] == ["x", "t", "cond"]
    for files in manifest["artifacts"]:
        assert all((bundle / name).is_file() for name in files.values())


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


def test_inputs_of_another_shape_are_refused(bundle):
    loaded = deploy.load(bundle)
    with pytest.raises(ValueError, match="'x' must have shape"):
        loaded(torch.randn(1, 4, 4, 64, 12), torch.ones(1), torch.randn(1, 64, 12))
    with pytest.raises(TypeError, match="takes 3 inputs"):
        loaded(torch.randn(1))


def _copy(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "manifest.json").unlink(), "has no manifest.json"),
    (lambda folder: (folder / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda folder: (folder / "segment004.pt2").unlink(), "segment004.pt2 is missing"),
    (lambda folder: _edit(folder, lambda m: m.update(format=99)), "format 99"),
    (lambda folder: _edit(folder, lambda m: m.pop("program")), "lacks program"),
    (lambda folder: _edit(folder, lambda m: m["cache"].update(speed=2)), "unknown cache settings"),
    (lambda folder: _edit(folder, lambda m: m["artifacts"].pop()), "artifacts for 13 segments"),
])
def test_malformed_bundles_fail_with_clear_errors(bundle, tmp_path, damage, message):
    folder = _copy(bundle, tmp_path)
    damage(folder)
    with pytest.raises(deploy.BundleError, match=message):
        deploy.load(folder)


def _edit(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_manifests_of_earlier_versions_still_load(inputs, bundle, tmp_path):
    """Earlier versions wrote a ``token`` flag per segment (unused); their bundles load and run the same."""
    noise, cond = inputs
    folder = _copy(bundle, tmp_path)
    _edit(folder, lambda m: [s.update(token=bool(files.get("full")))
                             for s, files in zip(m["program"]["segments"], m["artifacts"])])
    assert torch.equal(deploy.load(folder).sample(noise, cond), deploy.load(bundle).sample(noise, cond))


def test_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(deploy.BundleError, match="no bundle folder"):
        deploy.load(tmp_path / "nowhere")




def test_model_without_residual_sublayers_cannot_be_bundled(tmp_path):
    with pytest.raises(t4dopt.T4DUnsupportedError, match="cannot be cut into cache segments"):
        export_bundle(NoResidual().eval(), (torch.randn(2, 16, 8),), tmp_path / "b")
