"""`t4dopt.explain`: which attention became what, and why, without changing the model."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from t4dopt.backend import turbo4d
from t4dopt.errors import T4DWarning
from t4dopt.options import parse_options
from t4dopt.report import Report, collecting


def explain(model: torch.nn.Module, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Report:
    """Trace `model` on the given inputs with the turbo4d passes and report every attention site.

    The model runs once, with the rewritten graph executed eagerly (no Inductor compile). Sites are named by
    their module path in the model, in every graph dynamo compiles; an attention a graph break keeps out of
    the graphs is listed too (dense, with the break's source line and what would avoid it).
    """
    analysis = dataclasses.replace(parse_options(options), target="eager", strict=False, verify=False)
    backend = functools.partial(turbo4d, options=analysis)
    compiled = torch.compile(model, backend=backend)
    with collecting(model) as report, torch.no_grad():
        compiled(*args, **kwargs)
    if not report.graphs:
        warnings.warn("t4dopt.explain: dynamo compiled no graph for this call (this model's code was compiled "
                      "before in this process and its cache is full, or it runs under torch.compiler.disable); "
                      "call torch._dynamo.reset() first", T4DWarning, stacklevel=2)
    return report
