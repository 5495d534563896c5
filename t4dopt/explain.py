"""`t4dopt.explain`: which attention became what, and why, without changing the model."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch

from t4dopt.backend import turbo4d
from t4dopt.options import parse_options
from t4dopt.report import Report, collecting


def explain(model: torch.nn.Module, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Report:
    """Trace `model` on the given inputs with the turbo4d passes and report every attention site.

    The model runs once, with the rewritten graph executed eagerly (no Inductor compile).
    """
    analysis = dataclasses.replace(parse_options(options), target="eager", strict=False, verify=False)
    backend = functools.partial(turbo4d, options=analysis)
    compiled = torch.compile(model, backend=backend)
    with collecting() as report, torch.no_grad():
        compiled(*args, **kwargs)
    return report
