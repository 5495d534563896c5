import importlib.util
import subprocess
import sys

import pytest
from PIL import Image

from t4dopt.cli import main


def test_mask_command_draws_a_png(tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["mask", "--frames", "8", "--tokens-per-frame", "512", "--block-size", "16", "--out", str(out)]) == 0
    assert "density=0.581" in capsys.readouterr().out
    assert Image.open(out).size[0] > 64


def test_analyze_prints_the_explain_table(capsys):
    assert main(["analyze", "--config", "tiny", "--block-size", "16"]) == 0
    table = capsys.readouterr().out
    assert "spatiotemporal" in table and "sparse" in table and "cross" in table and "saved" in table


def test_demo_runs_end_to_end_eagerly(tmp_path, capsys):
    assert main(["demo", "--config", "tiny", "--block-size", "16", "--steps", "2", "--target", "eager",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "time per denoising step" in out and "relative L2" in out
    assert (tmp_path / "mask.png").exists()
    assert (tmp_path / "samples.png").exists() and (tmp_path / "samples.gif").exists()


def test_bad_arguments_exit_with_a_message(capsys):
    assert main(["mask", "--frames", "0", "--out", "x.png"]) == 2
    assert "frames=0" in capsys.readouterr().err


def test_passes_command_lists_the_passes_in_the_order_they_run(capsys):
    from t4dopt.passes import PASSES

    assert main(["passes"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert [line.split()[:2] for line in lines] == [[f"{i}.", p.__name__] for i, p in enumerate(PASSES, start=1)]
    names = [line.split()[1] for line in lines]
    assert names.index("detect_attention") < names.index("classify_layouts") < names.index("decide_sparsity") \
        < names.index("rewrite_sparse_sites") == len(names) - 1
    assert all(len(line.split(maxsplit=3)) == 4 for line in lines), "each line ends in the pass's docstring"
    script = "import t4dopt.passes as p; p.describe()"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == printed


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "t4dopt.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_tensorrt_export_without_tensorrt_says_what_to_install(tmp_path, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: the export builds an engine instead")
    assert main(["export", "--format", "tensorrt", "--out", str(tmp_path / "m.engine")]) == 2
    assert "pip install 't4dopt[tensorrt]'" in capsys.readouterr().err
