"""FX passes of the turbo4d backend, one concern a module, run in the order of `PASSES`.

``python -c "import t4dopt.passes as p; p.describe()"`` (or ``t4dopt passes``) prints that order.
"""

from .pipeline import ANALYSIS_PASSES, PASSES, analyze, describe, run_passes
from .state import PassState

__all__ = ["ANALYSIS_PASSES", "PASSES", "PassState", "analyze", "describe", "run_passes"]
