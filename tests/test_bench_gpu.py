"""bench/gpu.py, the one-call GPU benchmark: its dry run on this CPU, its time shares, its stops.

The dry run runs every part (GPU tests, attention table, end-to-end step, cache, AOTInductor)
at tiny size on the CPU, through the same scripts and functions as the GPU run, so the script
cannot rot between GPU sessions.
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
_saved_path = list(sys.path)
sys.path.insert(0, str(BENCH))  # the bench scripts import each other as top-level modules
import attention_gpu  # noqa: E402
import gpu  # noqa: E402
from gpu_parts import PARTS  # noqa: E402
from part_result import Column, PartResult  # noqa: E402

SCRIPTS = {part.name: importlib.import_module(part.module) for part in PARTS}
sys.path[:] = _saved_path  # bench/ holds modules named cache and export: keep them off the other tests' path

from reference import dense_masked_attention, random_qkv  # noqa: E402
from t4dopt import masks  # noqa: E402


def _run_gpu_py(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, str(BENCH / "gpu.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    result = _run_gpu_py("--dry-run", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return out, json.loads((out / "gpu.json").read_text()), result.stdout


def _table(part: dict, name: str) -> list[dict]:
    return next(t for t in part["result"]["tables"] if t["name"] == name)["rows"]


def test_dry_run_runs_every_part(dry_run):
    out, report, stdout = dry_run
    assert [p["name"] for p in report["parts"]] == [p.name for p in PARTS]
    assert all(p["status"] == "ok" for p in report["parts"]), [(p["name"], p["reason"]) for p in report["parts"]]
    assert report["dry_run"] and report["environment"]["device"].startswith("CPU")
    page = (out / "gpu.md").read_text()
    for part in PARTS:
        assert f"## {part.title}" in page
    assert "Not measured in this run (skipped, stopped or failed): none" in page
    assert "[attention]" in (out / "gpu.log").read_text() and "| part | status |" in stdout


def test_dry_run_collects_the_gpu_tests(dry_run):
    _, report, _ = dry_run
    details = next(p for p in report["parts"] if p["name"] == "pytest")["result"]["details"]
    marked = sum(1 for path in (ROOT / "tests").glob("test_*.py") for line in path.read_text().splitlines()
                 if line.strip() in ("@gpu", "@pytest.mark.gpu"))
    assert details["exit_code"] == 0 and details["counts"] == {"skipped": len(details["tests"])}
    assert len(details["tests"]) >= marked > 0  # parametrized tests count once per case


def test_dry_run_attention_row_is_complete_and_right(dry_run):
    _, report, _ = dry_run
    part = next(p for p in report["parts"] if p["name"] == "attention")
    (row,) = _table(part, "times")
    for key in ("cudnn", "flash", "flex", "triton", "flexpath"):
        assert row[f"{key}_ms"] > 0 and row[f"{key}_first_ms"] > 0 and row[f"{key}_tflops"] > 0
    assert row.get("fa4_ms") is None and any("FlashAttention-4 runs on CUDA only" in n for n in part["result"]["notes"])
    assert 0 < row["density"] < 1 and row["ideal"] == pytest.approx(1 / row["density"])
    assert row["triton_vs_flex"] == pytest.approx(row["flex_ms"] / row["triton_ms"])
    # fp16 through the interpreter, CPU FlexAttention and our Flex path, against float64 with the mask
    for key in ("flex", "triton", "flexpath"):
        assert row[f"{key}_error"] < 2e-3, key
    assert row["errors"] is None


def test_dry_run_end_to_end_cache_and_aoti_rows(dry_run):
    _, report, _ = dry_run
    parts = {p["name"]: p for p in report["parts"]}
    (step,) = _table(parts["end-to-end"], "steps")
    assert step["speedup"] == pytest.approx(step["dense_ms"] / step["sparse_ms"])
    assert step["flop_ideal"] > 1 and 0 < step["rel_diff"] < 0.1 and step["dense_compile_s"] > 0
    methods = [r["method"] for r in _table(parts["cache"], "samples")]
    assert methods == ["eager (full compute)", "turbo4d, threshold 0",
                       "turbo4d all levels, threshold 0.3, max_reuse 2", "teacache-style, threshold 0.2"]
    forms = {r["form"]: r for r in _table(parts["aoti"], "forms")}
    package = forms["AOTInductor package (turbo4d), fresh process"]
    assert package["rel_diff"] < 1e-4 and package["build_s"] > 0 and package["ms"] > 0


def test_a_part_that_would_overrun_its_share_is_skipped(tmp_path):
    result = _run_gpu_py("--dry-run", "--out", str(tmp_path), "--only", "aoti", "--budget-s", "100", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "aoti: SKIPPED, it would overrun its share" in result.stdout
    (part,) = json.loads((tmp_path / "gpu.json").read_text())["parts"]
    assert part["status"] == "skipped" and part["result"] is None and part["wall_s"] is None
    assert "Not measured in this run (skipped, stopped or failed): aoti" in (tmp_path / "gpu.md").read_text()


def test_bad_arguments_are_named(tmp_path):
    result = _run_gpu_py("--dry-run", "--out", str(tmp_path), "--only", "attention", "nope", timeout=60)
    assert result.returncode == 2 and "nope" in result.stderr and "attention" in result.stderr
    result = _run_gpu_py("--dry-run", timeout=60)
    assert result.returncode == 2 and "--out DIR is required" in result.stderr
    with pytest.raises(Exception, match="16x4096/16x128/bf16/fa4"):
        attention_gpu.Shape.parse("16x4096/16/bf16")


@pytest.mark.parametrize("part", [p for p in PARTS if p.name != "pytest"], ids=lambda p: p.name)
def test_the_gpu_runs_arguments_parse_and_fit_the_window(part):
    args = SCRIPTS[part.name].parse_args(part.argv(False))
    assert args.device == "cuda" and getattr(args, "compiler", "inductor") == "inductor"
    assert 0 < part.estimate_s(False) < gpu.DEFAULT_BUDGET_S / 2


def test_the_estimates_fit_the_budget():
    assert sum(part.estimate_s(False) for part in PARTS) < gpu.DEFAULT_BUDGET_S + 60  # + pytest without xdist here
    assert sum(part.estimate_s(True) for part in PARTS) < gpu.DEFAULT_BUDGET_S - gpu.RESERVE_S


@pytest.mark.parametrize("estimate, remaining, later, expected", [
    (10, 100, [50], 15),   # room to spare: up to 1.5 times the estimate
    (10, 100, [85], 15),
    (10, 100, [88], 12),   # the later parts' estimates come first
    (10, 100, [95], 10),   # never below the estimate while it fits
    (10, 8, [], 8),        # less left than the estimate: below it, so the part is skipped
    (10, 30, [], 15),
])
def test_time_shares(estimate, remaining, later, expected):
    assert gpu.share_for(estimate, remaining, later) == pytest.approx(expected)


def test_a_worker_past_its_share_is_stopped_with_its_children(tmp_path):
    child = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        sub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(child)!r}, "w").write(str(sub.pid))
        print("started", flush=True)
        time.sleep(300)
    """)
    log = tmp_path / "log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        run = gpu.run_worker([sys.executable, "-c", script], dict(os.environ), 3.0, handle, prefix="[w] ")
    assert run.timed_out and run.returncode is None and time.perf_counter() - start < 30
    assert "[w] started" in log.read_text()
    pid = int(child.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:  # the grandchild is gone (or a zombie waiting for init)
        state = Path(f"/proc/{pid}/stat")
        if not state.exists() or state.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the worker's child {pid} is still running")


def test_a_finished_worker_reports_its_exit_code(tmp_path):
    with open(tmp_path / "log", "w") as handle:
        run = gpu.run_worker([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ), 30, handle)
    assert run.returncode == 3 and not run.timed_out


def test_reference_rows_match_the_dense_masked_reference():
    """The attention table's float64 check (block table -> key mask per row) against tests/reference.py."""
    layout = masks.sculpt4d(3, 40, block_size=16, prefix_tokens=7)
    q, k, v = random_qkv(layout, batch=2, heads=2, head_dim=8)
    rows = attention_gpu.sampled_rows(layout.seq_len, 9)
    expected = dense_masked_attention(q, k, v, layout.token_mask())[:, :, rows]
    torch.testing.assert_close(attention_gpu.reference_rows(q, k, v, layout, rows), expected, rtol=1e-12, atol=1e-12)
    assert rows[0] == 0 and rows[-1] == layout.seq_len - 1 and len(set(rows.tolist())) == 9


def test_part_results_survive_a_round_trip(tmp_path):
    result = PartResult(tmp_path / "part.json")
    table = result.table("t", [Column("a", "A", "{:.2f}x"), Column("b", "B")])
    result.add_row(table, {"a": 1.234, "b": None})
    result.note("hello")
    loaded = PartResult.load(tmp_path / "part.json")
    assert loaded.to_json() == result.to_json()
    assert "| 1.23x | - |" in loaded.markdown() and "- hello" in loaded.markdown()
