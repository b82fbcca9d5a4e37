"""Counters a log exposes through ``statistics()``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LogStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LogStatistics:
    last_position: int
    appended: int  # records appended by this process since open
    batches: int  # write batches (group commits) since open
    fsyncs: int
    largest_batch: int
    bytes_written: int
