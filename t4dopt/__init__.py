"""t4dopt: a torch.compile backend (``backend="turbo4d"``) for video and 4D diffusion transformers.

It finds the attention in a model's graph, works out which axes each attention mixes,
rewrites joint spatio-temporal attention into Sculpt4D-style block-sparse attention, and
(``options={"cache": {...}}``) reuses sublayers across denoising steps after Turbo4DGen.
"""

from t4dopt import deploy, masks
from t4dopt.backend import turbo4d
from t4dopt.block_layout import BlockLayout
from t4dopt.cache import CacheReport, branch, cache_report, generation, reset, units_found
from t4dopt.calibrate import Calibration, calibrate
from t4dopt.errors import T4DInputError, T4DOptionError, T4DUnsupportedError, T4DVerifyError, T4DWarning
from t4dopt.explain import explain
from t4dopt.options import check_options
from t4dopt.ops import block_sparse_attention
from t4dopt.pipelines import enable
from t4dopt.report import Report, SiteReport
from t4dopt.traceable_processors import make_traceable

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "CacheReport",
    "Calibration",
    "Report",
    "SiteReport",
    "T4DInputError",
    "T4DOptionError",
    "T4DUnsupportedError",
    "T4DVerifyError",
    "T4DWarning",
    "block_sparse_attention",
    "branch",
    "cache_report",
    "calibrate",
    "check_options",
    "deploy",
    "enable",
    "explain",
    "generation",
    "make_traceable",
    "masks",
    "reset",
    "turbo4d",
    "units_found",
]
