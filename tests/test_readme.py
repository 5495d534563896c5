import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick_start)
    assert len(commands) == 2, "the quick start is exactly two commands"
    assert "t4dopt demo" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def _eager_turbo4d(monkeypatch) -> None:
    """Lower turbo4d eagerly in the examples as written: Inductor compiles take minutes on CI's CPU (other
    tests check Inductor against eager)."""
    compile_ = torch.compile

    def eager_turbo4d(model, backend=None, options=None, **kwargs):
        if backend == "turbo4d":
            options = {**(options or {}), "target": "eager"}
        return compile_(model, backend=backend, options=options, **kwargs)

    monkeypatch.setattr(torch, "compile", eager_turbo4d)


def test_cache_example_runs(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Reuse across denoising steps", 1)[1].split("\n### ", 1)[0]
    example = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)[0]
    # (tests/test_cache.py checks Inductor segments against eager ones.)
    _eager_turbo4d(monkeypatch)
    namespace = {}
    exec(compile(example, "README cache example", "exec"), namespace)
    report = namespace["t4dopt"].cache_report(namespace["model"])
    assert report.units and namespace["sample"].shape == namespace["noise"].shape


@pytest.mark.usefixtures("fresh_dynamo")
def test_the_mochi_example_runs_sparse_and_prints_what_it_says(monkeypatch, capsys):
    pytest.importorskip("diffusers")
    from t4dopt.report import collecting

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### diffusers video transformers", 1)[1].split("\n#### ", 1)[0]
    (example,) = [e for e in re.findall(r"```python\n(.+?)\n```", section, flags=re.S) if "make_traceable" in e]
    _eager_turbo4d(monkeypatch)
    with collecting() as report:
        exec(compile(example, "README Mochi example", "exec"), {})
    stated = re.search(r"print\(t4dopt\.make_traceable\(transformer\)\)\s*# (.+)", example).group(1)
    assert capsys.readouterr().out.strip() == stated.strip()
    joint = [s for s in report.sites if s.kind == "spatiotemporal"]
    assert [s.action for s in joint] == ["sparse", "sparse"] and all("key mask" in s.reason for s in joint)


def test_contributing_names_files_and_tests_that_exist():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    table = text.split("## Adding one thing", 1)[1].split("\n## ", 1)[0]
    paths = set(re.findall(r"`((?:t4dopt|tests)/[\w/]+\.py)`", table))
    assert len(paths) >= 8
    for path in paths:
        assert (ROOT / path).is_file(), path
    for test in re.findall(r"`(test_\w+)`", table):
        assert any(f"def {test}(" in p.read_text() for p in (ROOT / "tests").glob("test_*.py")), test
    for name in re.findall(r"`([A-Z_]{4,})`", table):
        assert any(name in p.read_text() for p in [*(ROOT / "t4dopt").rglob("*.py"), *(ROOT / "tests").glob("*.py")]), name


def test_the_readme_names_files_that_exist():
    text = (ROOT / "README.md").read_text()
    guarantees = text.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"`tests/test_\w+\.py`", guarantees)) >= 10
    for path in set(re.findall(r"`((?:t4dopt|tests|bench|examples)/[\w/.-]+\.py)", text)):
        assert (ROOT / path).is_file(), path
