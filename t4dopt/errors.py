"""Errors and warnings t4dopt raises, and the one place that turns a site left dense into either."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from t4dopt.options import Options
    from t4dopt.sites import HiddenAttention, SiteDecision


class T4DOptionError(ValueError):
    """An option of the turbo4d backend has an unknown name or a bad value.

    `option` names it as written (``cache['steps']``), `value` is what was given and `allowed` what
    would be accepted, where the check knows them. Raised from ``torch.compile``'s first call it
    arrives wrapped in dynamo's ``BackendCompilerFailed`` (the original is its ``inner_exception``);
    `t4dopt.check_options` raises it directly, before any call.
    """

    def __init__(self, message: str, *, option: str | None = None, value: Any = None, allowed: str | None = None):
        super().__init__(message)
        self.option, self.value, self.allowed = option, value, allowed


class BundleError(ValueError):
    """A deployment bundle that is missing, damaged, edited or not one of ours (`t4dopt.deploy.load`).

    `path` is the file at fault, `field` the manifest field (``cache.threshold``) where one is.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        super().__init__(message)
        self.path, self.field = path, field


class T4DInputError(ValueError):
    """An input given to a bundle or an AOTInductor package is not what it was exported with (shape, dtype,
    device); the message names the input and what it expects."""


class T4DUnsupportedError(RuntimeError):
    """With ``strict=True``: an attention site could not be rewritten."""


class T4DVerifyError(RuntimeError):
    """With ``verify=True``: the rewritten graph disagrees with its dense reference."""


class T4DWarning(UserWarning):
    """An attention site was left dense for a reason the user may want to fix."""


def warn_unless_strict(message: str, options: Options, stacklevel: int = 1) -> None:
    """`message` as a `T4DWarning`, or with ``strict=True`` as a `T4DUnsupportedError`: what every place that leaves
    something dense, uncached or unconfirmed does. `stacklevel` counts from the caller, as for ``warnings.warn``."""
    if options.strict:
        raise T4DUnsupportedError(message + " (strict=True)")
    warnings.warn(message, T4DWarning, stacklevel=stacklevel + 1)


def warn_or_raise(decisions: list[SiteDecision], options: Options, hidden: list[HiddenAttention] = ()) -> None:
    """Warn about each site left dense for a reason the user can fix and each attention a graph break keeps out
    of the graph (with ``strict=True``, raise), and about each site made sparse on a layout the graph did not
    confirm (``trust_layout=True``)."""
    for attention in hidden:
        message = (f"turbo4d: attention {attention.module} is not in the compiled graph: a graph break at "
                   f"{attention.where} ({attention.reason}); to keep it in: {attention.avoid}")
        warn_unless_strict(message, options, stacklevel=2)
    for decision in decisions:
        if not decision.warn:
            continue
        where = decision.site.module_path or decision.site.name
        if decision.action == "sparse":
            warnings.warn(f"turbo4d: attention {decision.site.name} ({where}) made sparse: {decision.reason}",
                          T4DWarning, stacklevel=2)
            continue
        warn_unless_strict(f"turbo4d: attention {decision.site.name} ({where}) left dense: {decision.reason}",
                           options, stacklevel=2)
