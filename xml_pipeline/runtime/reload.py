"""Hot reload: build and fully validate the new organism, then swap it in whole.

A reload that fails validation records ``ReloadRejected`` with the same file:line message that
``xml-pipeline check`` prints, and the running organism is untouched. A valid one records
``OrganismReloaded`` with the diff and swaps atomically (``Pump.swap``). Handler code is picked
up when the handler's own module file changed (modules it imports are not reloaded); a
listener is reported as changed (``handler_code``) only when the code its handler function
runs changed (``handler_code_digest``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FunctionType
from typing import Any

from xml_pipeline.config import Organism, load_organism
from xml_pipeline.errors import OrganismError
from xml_pipeline.runtime.pump import Pump
from xml_pipeline.runtime.recovery import budgets_of

__all__ = ["DEBOUNCE_MS", "ReloadResult", "diff_organisms", "handler_code_digest",
           "reload_organism", "restart_needed", "watch", "watched_files"]

_log = logging.getLogger("xml_pipeline.runtime.reload")

#: How long the watcher waits for a burst of writes (an editor's save) to end before it
#: reloads, in milliseconds. docs/reload.md gives this figure.
DEBOUNCE_MS = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadResult:
    success: bool
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    changes: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    #: organism settings that changed but take effect only when the process restarts
    restart_needed: tuple[str, ...] = ()
    #: the organism-wide sections that changed ("budgets", "limits", "api", ...)
    settings: tuple[str, ...] = ()
    #: the reload before this one was rejected, and this one found the files valid again
    recovered: bool = False
    #: an ``OrganismReloaded`` was recorded (something changed, or the organism recovered)
    recorded: bool = False

    def describe(self) -> str:
        """What the reload changed, in words: ``"no change"``, or for example
        ``"added 'c'; removed 'b'; updated 'a' (peers, handler_code)"``."""
        parts = []
        if self.added:
            parts.append("added " + ", ".join(repr(name) for name in self.added))
        if self.removed:
            parts.append("removed " + ", ".join(repr(name) for name in self.removed))
        if self.updated:
            parts.append("updated " + ", ".join(
                f"{name!r} ({', '.join(self.changes.get(name, []))})" for name in self.updated))
        if self.settings:
            parts.append("changed " + ", ".join(self.settings))
        text = "; ".join(parts) or "no change"
        if self.restart_needed:
            verb = "takes" if len(self.restart_needed) == 1 else "take"
            text += f" ({', '.join(self.restart_needed)} {verb} effect after a restart)"
        return text


#: Settings read once at start; the rest of the organism (listeners, budgets, limits,
#: retention, api.max_requests, log.snapshot_every) takes effect at a reload.
_AT_START = {"api.host": ("api", "host"), "api.port": ("api", "port"),
             "log.path": ("log", "path"), "log.url": ("log", "url"),
             "log.fsync": ("log", "fsync"), "log.segment_bytes": ("log", "segment_bytes")}
_SECTIONS = ("name", "budgets", "limits", "retention", "api", "log")


def restart_needed(old: Organism, new: Organism) -> tuple[str, ...]:
    """The settings of ``new`` that differ from ``old`` and wait for a restart."""
    return tuple(name for name, (section, key) in _AT_START.items()
                 if getattr(getattr(old, section), key) != getattr(getattr(new, section), key))


_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def handler_code_digest(fn: Callable[..., Any] | None) -> str | None:
    """A digest of the code ``fn`` runs, as its module is now: the function's own code
    (nested functions included, line numbers left out), its plain defaults and closure, and,
    followed by name through its module's globals, the functions of that module it uses and
    the plain constants it reads. Moving a function or editing another leaves it unchanged.
    A handler that is not a Python function is compared by identity."""
    if not isinstance(fn, FunctionType):
        return None if fn is None else f"object {id(fn)}"
    digest = hashlib.sha256()
    seen: set[int] = set()

    def plain(value: Any) -> str:
        if isinstance(value, _PLAIN):
            return repr(value)
        if isinstance(value, tuple):
            return "(" + ", ".join(plain(item) for item in value) + ")"
        return type(value).__qualname__  # an object's repr may hold its address

    def add_code(code: CodeType, function: FunctionType) -> None:
        digest.update(code.co_code)
        digest.update(repr((code.co_names, code.co_varnames, code.co_freevars,
                            code.co_cellvars, code.co_argcount, code.co_posonlyargcount,
                            code.co_kwonlyargcount, code.co_flags)).encode())
        for const in code.co_consts:
            if isinstance(const, CodeType):
                add_code(const, function)
            else:
                digest.update(f"\0{const!r}".encode())
        for name in code.co_names:
            value = function.__globals__.get(name)
            if isinstance(value, FunctionType) and value.__module__ == function.__module__:
                add_function(value)
            elif isinstance(value, _PLAIN):
                digest.update(f"\0{name}={value!r}".encode())

    def add_function(function: FunctionType) -> None:
        if id(function) in seen:
            return
        seen.add(id(function))
        digest.update(f"\0def {function.__qualname__}".encode())
        add_code(function.__code__, function)
        digest.update(plain((function.__defaults__, tuple(
            sorted((function.__kwdefaults__ or {}).items())))).encode())
        for cell in function.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # a cell not yet filled
                continue
            if isinstance(content, FunctionType):
                add_function(content)
            else:
                digest.update(plain(content).encode())

    add_function(fn)
    return digest.hexdigest()


def _code_digests(organism: Organism) -> dict[str, str | None]:
    return {name: handler_code_digest(listener.handler_fn)
            for name, listener in organism.listeners.items()}


def diff_organisms(old: Organism, new: Organism, *,
                   old_code: Mapping[str, str | None] | None = None
                   ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, list[str]]]:
    """``(added, removed, changes)`` where ``changes`` maps each changed listener to the
    settings that differ (``handler_code`` when the code its handler function runs changed).

    ``old_code`` is ``old``'s handler code digests taken before ``new`` was loaded: loading
    reloads an edited module in place, and the old functions then see the new module."""
    old_code = _code_digests(old) if old_code is None else old_code
    new_code = _code_digests(new)
    added = tuple(name for name in new.listeners if name not in old.listeners)
    removed = tuple(name for name in old.listeners if name not in new.listeners)
    changes: dict[str, list[str]] = {}
    for name, listener in new.listeners.items():
        before = old.listeners.get(name)
        if before is None:
            continue
        a, b = before.summary(), listener.summary()
        keys = [key for key in b if a.get(key) != b.get(key)]
        if old_code.get(name) != new_code[name] and "handler" not in keys:
            keys.append("handler_code")
        if keys:
            changes[name] = keys
    return added, removed, changes


async def reload_organism(pump: Pump, path: Path | None = None) -> ReloadResult:
    """Reload the organism of ``pump`` from ``path`` (its own file by default).

    Records ``ReloadRejected`` if the files are not valid, ``OrganismReloaded`` if the
    organism differs or if the reload before was rejected (the organism is good again, which
    clears ``last_reload_error``), and nothing otherwise."""
    from xml_pipeline.events import OrganismReloaded

    source = path or pump.organism.path
    old = pump.organism
    old_code = _code_digests(old)
    try:
        new = load_organism(source)
    except OrganismError as exc:
        await pump.record_rejected_reload(exc.message)
        return ReloadResult(success=False, error=exc.message)
    recovered = pump.state.agents.last_reload_error is not None
    added, removed, changes = diff_organisms(old, new, old_code=old_code)
    if not (added or removed or changes or recovered) and new.digest == old.digest:
        return ReloadResult(success=True)
    waiting = restart_needed(old, new)
    if waiting:
        _log.warning("organism reloaded, but %s take effect only after a restart",
                     ", ".join(waiting))
    event = OrganismReloaded(
        at=pump.clock(), name=new.name, digest=new.digest, source=new.source,
        budgets=budgets_of(new), retention=new.retention.summary(),
        listeners={name: listener.summary() for name, listener in new.listeners.items()},
        added=added, removed=removed, updated=tuple(changes), changes=changes,
    )
    await pump.swap(new, event)
    settings = tuple(name for name in _SECTIONS if getattr(old, name) != getattr(new, name))
    return ReloadResult(success=True, added=added, removed=removed, updated=tuple(changes),
                        changes=changes, restart_needed=waiting, settings=settings,
                        recovered=recovered, recorded=True)


def watched_files(organism: Organism) -> set[Path]:
    """organism.yaml, every XSD its listeners name, and every handler module's source file."""
    paths = {organism.path.resolve()}
    for listener in organism.listeners.values():
        paths.add(listener.schema.path.resolve())
        module = sys.modules.get((listener.handler or ":").partition(":")[0])
        source = getattr(module, "__file__", None)
        if source:
            paths.add(Path(source).resolve())
    return paths


def _fingerprint(files: set[Path]) -> tuple[tuple[str, int, int], ...]:
    marks = []
    for path in sorted(files):
        try:
            stat = path.stat()
            marks.append((str(path), stat.st_mtime_ns, stat.st_size))
        except OSError:
            marks.append((str(path), -1, -1))
    return tuple(marks)


async def watch(pump: Pump, *, stop: asyncio.Event, debounce_ms: int = DEBOUNCE_MS,
                on_result: Callable[[ReloadResult], None] | None = None) -> None:
    """Reload ``pump``'s organism whenever one of its files changes, until ``stop`` is set.

    Directories are watched (an editor's save-as-rename replaces the file), and changes are
    debounced: a burst of writes within ``debounce_ms`` is one reload. The files' sizes and
    times are also compared every half second, so that a change made while the watcher was
    starting is not missed. A reload that records nothing is not reported. When the set of
    files changes (a schema added, say), the watch starts again on the new set.
    """
    import watchfiles

    last: tuple[tuple[str, int, int], ...] | None = None
    while not stop.is_set():
        files = watched_files(pump.organism)
        folders = sorted({str(path.parent) for path in files})
        names = {str(path) for path in files}

        def wanted(change: watchfiles.Change, path: str, names: set[str] = names) -> bool:
            return str(Path(path).resolve()) in names

        async for _changes in watchfiles.awatch(*folders, watch_filter=wanted,
                                                debounce=debounce_ms, step=20,
                                                stop_event=stop, recursive=False,
                                                rust_timeout=500, yield_on_timeout=True):
            current = _fingerprint(files)
            if current == last:
                continue
            last = current
            result = await reload_organism(pump)
            if result.success and not result.recorded:
                continue
            if result.recovered:
                _log.info("The organism is good again after the rejected reload: %s.",
                          result.describe())
            elif result.success:
                _log.info("Organism reloaded: %s.", result.describe())
            else:
                _log.error("reload rejected; the running organism is unchanged:\n%s",
                           result.error)
            if on_result is not None:
                on_result(result)
            if watched_files(pump.organism) != files:
                break  # watch the new set of files
