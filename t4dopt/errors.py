"""Errors and warnings t4dopt raises."""


class T4DOptionError(ValueError):
    """An option of the turbo4d backend has an unknown name or a bad value."""


class T4DUnsupportedError(RuntimeError):
    """With ``strict=True``: an attention site could not be rewritten."""


class T4DVerifyError(RuntimeError):
    """With ``verify=True``: the rewritten graph disagrees with its dense reference."""


class T4DWarning(UserWarning):
    """An attention site was left dense for a reason the user may want to fix."""
