"""Handler code named in organism.yaml (``handler: module:function``), imported once per load.

A module whose file changed since a load imported it is reloaded, so that a reload of the
organism picks up edited handler code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from xml_pipeline.config.yamlsafe import did_you_mean, show

__all__ = ["resolve_handler"]


#: module name -> digest of its source file when it was (re)imported by a load
_module_digests: dict[str, str] = {}


def _file_digest(module: ModuleType) -> str | None:
    source = getattr(module, "__file__", None)
    if not source:
        return None
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except OSError:
        return None


def _import_fresh(name: str) -> ModuleType:
    """Import a handler module, or reload it if its file changed since it was imported (so a
    reload picks up edited handler code); only that module, not the modules it imports."""
    module = sys.modules.get(name)
    if module is None:
        module = importlib.import_module(name)
    elif (digest := _file_digest(module)) and _module_digests.get(name) not in (None, digest):
        # Bytecode is reused if size and mtime (whole seconds) match: a quick edit may not.
        with contextlib.suppress(AttributeError, OSError, TypeError):
            Path(module.__cached__).unlink(missing_ok=True)
        module = importlib.reload(module)
    digest = _file_digest(module)
    if digest is not None:
        _module_digests[name] = digest
    return module


def resolve_handler(ref: str, root: Path) -> Callable[..., Any] | str:
    """The handler function ``ref`` names, or the sentence that says why there is none."""
    module_name, _, attr = ref.partition(":")
    if not (attr.isidentifier() and all(part.isidentifier() for part in module_name.split("."))):
        return (f"handler {show(ref)} must be written 'module:function', "
                "for example examples.hello:greet.")
    folder = str(root)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = _import_fresh(module_name)
    except ModuleNotFoundError as exc:
        return (f"handler {show(ref)}: cannot import module '{module_name}' ({exc}); "
                f"module paths are relative to {folder}.")
    except Exception as exc:  # any error raised while importing the operator's code
        return (f"handler {show(ref)}: importing '{module_name}' raised "
                f"{type(exc).__name__}: {exc}.")
    fn = getattr(module, attr, None)
    if fn is None:
        public = [n for n in vars(module) if not n.startswith("_")]
        return (f"handler {show(ref)}: module '{module_name}' has no '{attr}'."
                f"{did_you_mean(attr, public)}")
    if not inspect.iscoroutinefunction(fn):
        return (f"handler {show(ref)} must be an 'async def' function taking "
                "(payload, ctx).")
    return fn
