"""Anchors: what each snapshot of a file log says about the log's history.

A snapshot (``snapshots``) is a file in the log directory's ``snapshots/`` folder
that starts with its anchor: the position it includes, where that record's frame is
(segment file and offset) and that record's chain hash. Since the chain hash of a record
depends on every record before it, an anchor is a cheap witness of the whole history up to
its position: opening the log checks that the log still holds that record with that hash
(``integrity.check_log``), and ``verify_log`` checks it against the chain it recomputes.

Only the anchor is read here, from the first bytes of the file: the state after it may be
large, and it is the state layer's business.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

__all__ = ["ANCHOR_VERSION", "SNAPSHOTS", "SUFFIX", "Anchor", "anchors", "read_anchor"]

SNAPSHOTS = "snapshots"
ANCHOR_VERSION = 1
SUFFIX = ".snapshot"
_HEAD = 4096  # the anchor's fields, before the state, fit well within this
_STATE = b',"state":'


class Anchor(msgspec.Struct):
    """The first fields of a snapshot file, in this order (the state follows them)."""

    version: int
    position: int
    segment: str
    offset: int
    chain_hash: str


def read_anchor(path: Path) -> Anchor | None:
    """The anchor at the start of the snapshot file ``path``, or None if it cannot be read
    (gone, cut short, another format or version): such a snapshot is never used either."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD)
    except OSError:
        return None
    end = head.find(_STATE)
    if end < 0:
        return None
    try:
        anchor = msgspec.json.decode(head[:end] + b"}", type=Anchor)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if anchor.version != ANCHOR_VERSION or anchor.position < 1:
        return None
    return anchor


def anchors(directory: Path) -> list[tuple[Path, Anchor]]:
    """Every readable anchor of the log in ``directory``, oldest position first."""
    folder = directory / SNAPSHOTS
    try:
        names = sorted(entry.name for entry in os.scandir(folder)
                       if entry.name.endswith(SUFFIX))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        anchor = read_anchor(folder / name)
        if anchor is not None:
            found.append((folder / name, anchor))
    found.sort(key=lambda item: item[1].position)
    return found
