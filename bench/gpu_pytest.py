"""The GPU-marked tests (``pytest -m gpu``), with every outcome recorded as it comes.

Runs pytest in this process with a small plugin that writes each test's outcome and duration
into a `PartResult` (saved after each test, so a run stopped at its time limit keeps the
outcomes so far). The table lists the tests that did not pass or skip; the details hold all.
Only the test files that apply the marker (a ``@pytest.mark.gpu`` decorator, an alias
``gpu = pytest.mark.gpu`` or a ``pytestmark`` with it) are collected: the others cannot hold a
GPU test, and importing them all (diffusers, onnx) takes longer than the tests.
Where pytest-xdist is installed and a GPU is there (the GPU machine has both) the tests run in 4
worker processes, which compile their Triton and Inductor kernels side by side; on CPU (the dry
run) they run in this process.

    python bench/gpu_pytest.py [extra pytest arguments]
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from device_info import describe
from part_result import Column, PartResult

ROOT = Path(__file__).resolve().parents[1]
XDIST_WORKERS = 4
MARKER = re.compile(r"^\s*(@pytest\.mark\.gpu\b|\w+\s*=\s*pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)",
                    re.MULTILINE)
COLUMNS = [Column("test", "test"), Column("outcome", "outcome"), Column("seconds", "s", "{:.1f}"),
           Column("message", "message")]


class OutcomeRecorder:
    """pytest plugin: one outcome per test (a failing setup or teardown counts as an error)."""

    def __init__(self, result: PartResult) -> None:
        self.result = result
        self.table = result.table("tests", COLUMNS, "GPU-marked tests that did not pass (skips in the details)")
        self.outcomes: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        entry = self.outcomes.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed",
                                                         "seconds": 0.0, "message": None})
        entry["seconds"] += report.duration
        if report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["message"] = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else None
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
            entry["message"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else None
        if report.when == "teardown":
            self._finished(entry)

    def _finished(self, entry: dict) -> None:
        if entry["outcome"] in ("failed", "error"):
            self.table.rows.append(entry)
        counts = Counter(e["outcome"] for e in self.outcomes.values())
        self.result.details["counts"] = dict(counts)
        self.result.details["tests"] = list(self.outcomes.values())
        self.result.save()


def gpu_test_files() -> list[str]:
    """The test files that apply the ``gpu`` marker (see `MARKER`)."""
    return [str(path) for path in sorted((ROOT / "tests").glob("test_*.py")) if MARKER.search(path.read_text())]


def pytest_args(extra: Sequence[str] = ()) -> list[str]:
    args = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE", *gpu_test_files()]
    if torch.cuda.is_available() and importlib.util.find_spec("xdist") is not None:
        args += ["-n", str(XDIST_WORKERS)]
    return args + list(extra)


def main(argv: Sequence[str] | None = None, result: PartResult | None = None) -> PartResult:
    result = result or PartResult()
    result.environment = describe(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args = pytest_args(sys.argv[1:] if argv is None else argv)
    recorder = OutcomeRecorder(result)
    result.details["command"] = "python -m pytest " + " ".join(args)
    result.note("collected from " + ", ".join(Path(f).name for f in gpu_test_files()))
    code = int(pytest.main(args, plugins=[recorder]))
    result.details["exit_code"] = code
    counts = result.details.get("counts", {})
    result.note("pytest " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f" (exit code {code})")
    skipped = Counter(e["message"] for e in recorder.outcomes.values() if e["outcome"] == "skipped")
    for reason, n in skipped.most_common():
        result.note(f"{n} skipped: {reason}")
    if code not in (0, 5) and not recorder.table.rows:
        result.note("pytest stopped before any test failed (collection error or interrupted): see the log")
    result.save()
    return result


if __name__ == "__main__":
    main()
