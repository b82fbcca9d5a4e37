"""The crash loop of ``benchmarks/chaos.py``, shortened: five SIGKILLs of a loaded organism.

Clients inject steadily into a three-hop chain run by ``xml-pipeline run``; the process is
killed after a seeded random number of acknowledged injections (or at once, while the previous
crash's backlog is redelivered, or while it starts) and restarted on the same log; unanswered
requests are sent again with their idempotency key. The log must then hold every acknowledged
message exactly once, in the thread the client was told, with its whole conversation handled,
and the live state must equal the replayed state."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import ROOT


def _load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "benchmarks" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("chaos", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


async def test_crash_loop_loses_nothing_and_duplicates_no_injection(tmp_path: Path) -> None:
    # seed 12 kills after 337 and 180 acknowledgements, at once (0: while the backlog is
    # redelivered), while starting (replaying the log), then after 141
    report = await chaos.crash_loop(tmp_path / "org", rounds=5, seed=12, clients=8,
                                    max_acks=400, repeat=20, baseline=0)
    assert report.lost == []
    assert report.wrong == []
    assert report.acknowledged > 0
    assert report.resent > 0  # requests were cut off by the kills and sent again
    assert report.repeated == 20  # acknowledged ones too, after the last restart: same ids
    # every injection was answered in the end (sent again with its key after a crash) ...
    assert report.acknowledged == report.injections == report.accepted
    # ... and every hop of every conversation ran at least once
    assert report.hops_accepted == report.hops_handled == 3 * report.acknowledged
    assert report.live["digest"] == report.replayed[1]
    assert report.startup_kills == 1
    assert len(report.served) == len(report.restart_seconds) == 5
