"""Errors raised by rfc_compile."""


class UnsupportedModelError(ValueError):
    """The passes do not recognise this model (no known transformer blocks / cached regions).

    The message names what was found (block classes, module paths), so the user can tell
    whether a pattern is missing or the model is simply not a diffusion transformer.
    """
