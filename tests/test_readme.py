import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick_start)
    assert len(commands) == 2, "the quick start is exactly two commands"
    assert "t4dopt demo" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_cache_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Reuse across denoising steps", 1)[1].split("\n### ", 1)[0]
    example = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)[0]
    namespace = {}
    exec(compile(example, "README cache example", "exec"), namespace)
    report = namespace["t4dopt"].cache_report(namespace["model"])
    assert report.units and namespace["sample"].shape == namespace["noise"].shape


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
