"""The handlers shipped with pubrelay, one module or sub-package per handler name.

Each registers in the entry-point group ``pubrelay.handlers`` (see ``pyproject.toml``) and
uses the runtime exactly as a third-party plugin does: through :mod:`handlers.types`.
"""
