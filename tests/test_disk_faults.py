"""Disk faults: when the log cannot be written, nothing is acknowledged, nothing is
dispatched, clients get 503 with the reason, and everything resumes when the fault clears."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests import handlers
from tests.api_server import running_server
from tests.conftest import write_organism
from tests.test_file_log import FaultyDisk
from tests.test_pump import ITEM_XSD, ORGANISM, item
from xml_pipeline.config import load_organism
from xml_pipeline.errors import LogWriteError
from xml_pipeline.events import HandlerSucceeded, MessageAccepted, MessageDelivered
from xml_pipeline.log.file import open_file_log
from xml_pipeline.runtime.pump import Pump, open_pump
from xml_pipeline.state import replay


async def _healthy(pump: Pump) -> None:
    await pump.wait_until(lambda: pump.fault is None)


@pytest.mark.parametrize("fault", ["write", "sync"])
async def test_a_failing_disk_stops_the_pump_and_it_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    handlers.reset()
    path = write_organism(tmp_path / "org", ORGANISM, schemas={"item.xsd": ITEM_XSD})
    disk = FaultyDisk(monkeypatch)
    log = await open_file_log(tmp_path / "events")
    async with open_pump(load_organism(path), log) as pump:
        await pump.inject(item(0), to="third")
        await pump.wait_idle()
        blocked = await pump.inject(item(1), to="slow")  # its handler waits for the gate
        await pump.wait_until(lambda: bool(handlers.entered))
        durable = log.last_position
        disk.set(fault)
        with pytest.raises(LogWriteError):
            await pump.inject(item(2), to="third")
        with pytest.raises(LogWriteError) as refused:  # refused at once while failing
            await pump.inject(item(3), to="third")
        assert refused.value.message.startswith("The event log cannot be written (No space "
                                                "left on device), so no message is accepted")
        handlers.gate.set()  # the handler's send and outcome now meet the failing log
        # back in its mailbox
        await pump.wait_until(lambda: pump.mailbox("slow").statistics().queued > 0)
        assert log.last_position == durable  # nothing more became durable
        assert [s["listener"] for s in handlers.seen] == ["third", "slow"]
        disk.set(None)
        await _healthy(pump)
        await pump.wait_idle()
        after = await pump.inject(item(4), to="third")
        await pump.wait_idle()
        # The slow message was handled again after recovery, and its send went through once.
        assert [s["listener"] for s in handlers.seen] == ["third", "slow", "slow", "third",
                                                          "third"]
        assert handlers.seen[2]["redelivery"] is True
        assert [s["n"] for s in handlers.seen if s["listener"] == "third"] == [
            "0", "after-gate", "4"]
        events = [r.event async for r in log.read()]
        accepted = [e for e in events if isinstance(e, MessageAccepted)]
        assert "<n>2</n>" not in "".join(e.envelope for e in accepted)  # never acknowledged
        assert after.message_id in {e.message_id for e in accepted}
        handled = Counter(e.message_id for e in events if isinstance(e, HandlerSucceeded))
        assert handled[blocked.message_id] == 1
        assert all(count == 1 for count in handled.values())
        delivered = Counter(e.message_id for e in events if isinstance(e, MessageDelivered))
        assert delivered[blocked.message_id] >= 1
        replayed = await replay(log)
        assert replayed.digest() == pump.state.digest()
    await log.aclose()


async def test_the_api_answers_503_with_the_reason_until_the_disk_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handlers.reset()
    path = write_organism(tmp_path / "org", ORGANISM, schemas={"item.xsd": ITEM_XSD})
    disk = FaultyDisk(monkeypatch)
    body = {"to": "third", "payload": "<Item><n>1</n></Item>"}
    async with running_server(load_organism(path), tmp_path / "events") as (base, _):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            assert (await http.post("/api/v1/inject", json=body)).status_code == 202
            await http.get("/api/v1/organism/state")  # idle: its outcome is durable
            disk.set("sync")
            first = await http.post("/api/v1/inject", json=body)
            assert first.status_code == 503
            assert first.json()["error"]["code"] == "log_write_failed"
            assert first.headers["retry-after"] == "1"
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failing"
            again = await http.post("/api/v1/inject", json=body)
            assert again.status_code == 503
            assert "No space left on device" in again.json()["error"]["message"]
            disk.set(None)
            while (await http.get("/health")).status_code != 200:
                pass  # the pump probes the disk every half second
            assert (await http.post("/api/v1/inject", json=body)).status_code == 202
            await http.get("/api/v1/organism/state")
    assert [s["n"] for s in handlers.seen] == ["1", "1"]
