"""What every export returns: the file it wrote and the attention sites it rewrote on the way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from t4dopt.report import SiteReport, count_rewritten


@dataclass(frozen=True)
class ExportedArtifact:
    """The artifact at `path` and the model's attention sites (None when it was built from a file)."""

    path: Path
    sites: list[SiteReport] | None

    @property
    def sites_rewritten(self) -> int:
        """Attention sites made block-sparse."""
        return count_rewritten(self.sites or [])

    @property
    def file_bytes(self) -> int:
        """Bytes on disk: the file, or every file of the folder."""
        if self.path.is_dir():
            return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return self.path.stat().st_size
