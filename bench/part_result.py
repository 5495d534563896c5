"""Tables of measured figures: the columns, the rows as raw values, and their Markdown.

A benchmark fills a `PartResult` (one or more `Table`s and notes). With a path, the result is
written to JSON after every row, so a run stopped at its time limit keeps what it had measured.
The bench scripts print the same tables on their own (`markdown`), and `bench/gpu.py` gathers
the JSON of every part into one file and one Markdown page.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    """One column: the row key, its header, and how a value is shown (a ``str.format`` pattern)."""

    key: str
    header: str
    fmt: str = "{}"

    def show(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, str):
            return value
        try:
            return self.fmt.format(value)
        except (ValueError, TypeError):
            return str(value)


@dataclass
class Table:
    name: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    caption: str = ""

    def markdown(self) -> str:
        lines = ["| " + " | ".join(c.header for c in self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(c.show(row.get(c.key)) for c in self.columns) + " |" for row in self.rows]
        return "\n".join(([self.caption, ""] if self.caption else []) + lines)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "caption": self.caption, "rows": self.rows,
                "columns": [[c.key, c.header, c.fmt] for c in self.columns]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Table:
        return cls(data["name"], [Column(*c) for c in data["columns"]], list(data["rows"]), data.get("caption", ""))


class PartResult:
    """Tables, notes and details of one benchmark; saved to `path` (if given) after each change."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.tables: list[Table] = []
        self.notes: list[str] = []
        self.details: dict[str, Any] = {}
        self.environment: dict[str, Any] = {}

    def table(self, name: str, columns: list[Column], caption: str = "") -> Table:
        """The table called `name`, created empty on first use."""
        for table in self.tables:
            if table.name == name:
                return table
        self.tables.append(Table(name, columns, caption=caption))
        self.save()
        return self.tables[-1]

    def add_row(self, table: Table, row: dict[str, Any]) -> None:
        table.rows.append(row)
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps(self.to_json(), indent=1, default=str))
        scratch.replace(self.path)  # never a half-written file, even if the process is killed

    def to_json(self) -> dict[str, Any]:
        return {"tables": [t.to_json() for t in self.tables], "notes": self.notes, "details": self.details,
                "environment": self.environment}

    @classmethod
    def load(cls, path: str | Path) -> PartResult:
        result = cls()
        data = json.loads(Path(path).read_text())
        result.tables = [Table.from_json(t) for t in data["tables"]]
        result.notes, result.details = list(data["notes"]), dict(data["details"])
        result.environment = dict(data.get("environment", {}))
        return result

    def markdown(self) -> str:
        parts = [t.markdown() for t in self.tables if t.rows]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)
