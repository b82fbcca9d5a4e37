"""The application's lifespan owns what runs beside the endpoints: the file watcher runs while
the application does, ends with it, and an error of its own is never lost."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests import handlers
from tests.conftest import write_organism
from tests.test_pump import ITEM_XSD, ORGANISM
from xml_pipeline.api import app as api_app
from xml_pipeline.api.app import create_app
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.runtime.pump import Pump
from xml_pipeline.runtime.reload import watch as reload_watch


@pytest.fixture
def organism(tmp_path: Path) -> Organism:
    handlers.reset()
    return load_organism(write_organism(tmp_path / "org", ORGANISM,
                                        schemas={"item.xsd": ITEM_XSD}))


async def test_the_file_watcher_runs_with_the_application_and_ends_with_it(
        organism: Organism, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    watchers: list[asyncio.Task[object]] = []
    started = asyncio.Event()

    async def watch(pump: Pump, *, stop: asyncio.Event) -> None:
        task = asyncio.current_task()
        assert task is not None
        watchers.append(task)
        started.set()
        await reload_watch(pump, stop=stop)

    monkeypatch.setattr(api_app, "reload_watch", watch)
    app = create_app(organism, data=tmp_path / "events", watch=True)
    async with app.router.lifespan_context(app):
        await started.wait()
        assert not watchers[0].done()
    # Shutdown waited for the watcher to end: nothing of it runs on.
    assert watchers[0].done() and not watchers[0].cancelled()
    assert watchers[0].exception() is None


async def test_a_failed_file_watcher_is_logged_at_once_and_raised_at_shutdown(
        organism: Organism, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    failed = asyncio.Event()

    async def broken_watch(pump: Pump, *, stop: asyncio.Event) -> None:
        failed.set()
        raise OSError("inotify watch limit reached")

    monkeypatch.setattr(api_app, "reload_watch", broken_watch)
    app = create_app(organism, data=tmp_path / "events", watch=True)
    with caplog.at_level(logging.ERROR, logger="xml_pipeline.api"), \
            pytest.raises(ExceptionGroup) as raised:
        async with app.router.lifespan_context(app):
            await failed.wait()
            logged = [r for r in caplog.records if r.name == "xml_pipeline.api"]
            assert [r.getMessage() for r in logged] == [
                "Watching the organism's files failed: changes to them are not reloaded until "
                "a restart (POST /api/v1/organism/reload still works)."]
            assert logged[0].exc_info is not None
            # The organism goes on serving until it is stopped.
            pump: Pump = app.state.pump
            assert pump.fault is None
            await pump.inject(b"<Item><n>1</n></Item>", to="third")
            await pump.wait_idle()
    assert raised.group_contains(OSError, match=r"^inotify watch limit reached$")
