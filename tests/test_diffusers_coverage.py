"""The README's diffusers coverage table is what `tests/diffusers_coverage.py` measures now.

Regenerate it with `python tests/diffusers_coverage.py --write` when a change moves a row.
"""

import re

import pytest

pytest.importorskip("diffusers")

import diffusers_coverage as coverage

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

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


def test_every_sparse_row_is_close_to_its_reference():
    for make in coverage.MODELS:
        row = coverage.measure(make).row
        assert row.error < 1e-4, row
        assert row.sparse in (0, row.joint), row
