"""Hot reload: build and fully validate the new organism, then swap it in whole.

A reload that fails validation records ``ReloadRejected`` with the same file:line message that
``xml-pipeline check`` prints, and the running organism is untouched. A valid one records
``OrganismReloaded`` with the diff and swaps atomically (``Pump.swap``). Handler code is picked
up when the handler's own module file changed (modules it imports are not reloaded).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xml_pipeline.errors import OrganismError
from xml_pipeline.organism import Organism, load_organism
from xml_pipeline.pump import Pump, budgets_of

__all__ = ["ReloadResult", "diff_organisms", "reload_organism", "restart_needed", "watch",
           "watched_files"]

_log = logging.getLogger("xml_pipeline.reload")


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


#: Settings read once at start; the rest of the organism (listeners, budgets, limits,
#: retention, api.max_requests, log.snapshot_every) takes effect at a reload.
_AT_START = {"api.host": ("api", "host"), "api.port": ("api", "port"),
             "log.path": ("log", "path"), "log.url": ("log", "url"),
             "log.fsync": ("log", "fsync"), "log.segment_bytes": ("log", "segment_bytes")}


def restart_needed(old: Organism, new: Organism) -> tuple[str, ...]:
    """The settings of ``new`` that differ from ``old`` and wait for a restart."""
    return tuple(name for name, (section, key) in _AT_START.items()
                 if getattr(getattr(old, section), key) != getattr(getattr(new, section), key))


def diff_organisms(old: Organism, new: Organism
                   ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, list[str]]]:
    """``(added, removed, changes)`` where ``changes`` maps each changed listener to the
    settings that differ (``handler_code`` when the handler function itself changed)."""
    added = tuple(name for name in new.listeners if name not in old.listeners)
    removed = tuple(name for name in old.listeners if name not in new.listeners)
    changes: dict[str, list[str]] = {}
    for name, listener in new.listeners.items():
        before = old.listeners.get(name)
        if before is None:
            continue
        a, b = before.summary(), listener.summary()
        keys = [key for key in b if a.get(key) != b.get(key)]
        if before.handler_fn is not listener.handler_fn and "handler" not in keys:
            keys.append("handler_code")
        if keys:
            changes[name] = keys
    return added, removed, changes


async def reload_organism(pump: Pump, path: Path | None = None) -> ReloadResult:
    """Reload the organism of ``pump`` from ``path`` (its own file by default)."""
    from xml_pipeline.events import OrganismReloaded

    source = path or pump.organism.path
    try:
        new = load_organism(source)
    except OrganismError as exc:
        await pump.record_rejected_reload(exc.message)
        return ReloadResult(success=False, error=exc.message)
    added, removed, changes = diff_organisms(pump.organism, new)
    if not added and not removed and not changes and new.digest == pump.organism.digest:
        return ReloadResult(success=True)
    waiting = restart_needed(pump.organism, new)
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
    return ReloadResult(success=True, added=added, removed=removed, updated=tuple(changes),
                        changes=changes, restart_needed=waiting)


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


async def watch(pump: Pump, *, stop: asyncio.Event, debounce_ms: int = 200,
                on_result: Callable[[ReloadResult], None] | None = None) -> None:
    """Reload ``pump``'s organism whenever one of its files changes, until ``stop`` is set.

    Directories are watched (an editor's save-as-rename replaces the file), and changes are
    debounced: a burst of writes within ``debounce_ms`` is one reload. The files' sizes and
    times are also compared every half second, so that a change made while the watcher was
    starting is not missed. A reload that changes nothing is not reported. When the set of
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
            if result.success and not (result.added or result.removed or result.updated):
                continue
            if result.success:
                _log.info("organism reloaded: added %s, removed %s, updated %s",
                          list(result.added), list(result.removed), list(result.updated))
            else:
                _log.error("reload rejected; the running organism is unchanged:\n%s",
                           result.error)
            if on_result is not None:
                on_result(result)
            if watched_files(pump.organism) != files:
                break  # watch the new set of files
