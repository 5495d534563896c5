"""``bench/attention.py --device cpu``: the quiet and busy columns, at a tiny size (so the script cannot rot)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_attention_bench_prints_quiet_and_busy_columns():
    result = subprocess.run(
        [sys.executable, "bench/attention.py", "--device", "cpu", "--busy", "--no-flex", "--repeats", "2",
         "--frames", "2", "--tokens-per-frame", "64", "--block-size", "16", "--heads", "1", "--head-dim", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header, _, row = [line for line in result.stdout.splitlines() if line.startswith("|")]
    names = [cell.strip() for cell in header.strip("|").split("|")]
    cells = dict(zip(names, (cell.strip() for cell in row.strip("|").split("|"))))
    assert names.count("dense SDPA ms") == 2 and names.count("others' cores") == 2
    assert "quiet: load avg" in names and "busy: load avg" in names
    assert cells["frames"] == "2" and cells["tokens"] == "128" and float(cells["dense SDPA ms"]) > 0
    values = row.strip("|").split("|")
    busy_others = float(values[names.index("busy: load avg") + 1])
    assert busy_others > 0.5  # the busy process took about a core


def test_context_parallel_bench_dry_run_prints_its_row():
    """``bench/context_parallel.py --dry-run``: the single-rank Ulysses and Ring paths on CPU, tiny."""
    env = {**__import__("os").environ, "MASTER_PORT": str(_free_port())}
    result = subprocess.run([sys.executable, "bench/context_parallel.py", "--dry-run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    header, _, row = [line for line in result.stdout.splitlines() if line.startswith("|")]
    cells = dict(zip((c.strip() for c in header.strip("|").split("|")), (c.strip() for c in row.strip("|").split("|"))))
    assert cells["world"] == "1" and cells["balance"] == "1.000" and float(cells["ring ours ms"]) > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
