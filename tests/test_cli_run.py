"""``xml-pipeline run``: startup failures are one clear line and the documented exit status;
the start banner prints an inject command that works as pasted."""

from __future__ import annotations

import asyncio
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from xml_pipeline.events import OrganismStarted
from xml_pipeline.log.file import open_file_log
from xml_pipeline.log.file.segments import segments

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xml_pipeline", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def events_of(directory: Path) -> list[object]:
    log = await open_file_log(directory, readonly=True)
    try:
        return [record.event async for record in log.read(after=0)]
    finally:
        await log.aclose()


def test_port_in_use_is_one_line_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("run", "organism.yaml", "--data", str(tmp_path / "events"),
                     "--port", str(port), "--no-watch")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines == [f"Cannot listen on 127.0.0.1:{port}: the address is already in use. "
                     f"Stop what listens there, or choose another --port."]
    # Nothing was started, so nothing was recorded.
    assert not (tmp_path / "events").exists() or asyncio.run(
        events_of(tmp_path / "events")) == []


def test_locked_log_is_one_line_exit_1(tmp_path: Path) -> None:
    async def scenario() -> subprocess.CompletedProcess[str]:
        log = await open_file_log(tmp_path / "events")
        try:
            return await asyncio.to_thread(run, "run", "organism.yaml", "--data",
                                           str(tmp_path / "events"), "--port",
                                           str(free_port()), "--no-watch")
        finally:
            await log.aclose()

    result = asyncio.run(scenario())
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"The log at {tmp_path / 'events'} is being written by process {__import__('os').getpid()}"
        "; stop it first, or read this log without writing (tail, replay)."]
    assert "Traceback" not in result.stdout + result.stderr


def test_damaged_log_is_one_line_exit_1(tmp_path: Path) -> None:
    data = tmp_path / "events"
    # A log with a few records, then one byte flipped in the first frame (good frames follow).
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", "run", "organism.yaml", "--data", str(data),
         "--port", str(port), "--no-watch", "--no-access-log"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "Uvicorn running on" in line:
            break
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 0
    (_, first), *_ = segments(data)
    raw = bytearray(first.read_bytes())
    raw[20] ^= 0xFF
    first.write_bytes(bytes(raw))
    result = run("run", "organism.yaml", "--data", str(data), "--port", str(free_port()),
                 "--no-watch")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert str(data) in result.stderr


def test_banner_inject_command_works_as_pasted(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "events"
    process = subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", "run", str(ROOT / "organism.yaml"), "--data",
         str(data), "--port", str(port), "--no-watch", "--no-access-log"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    banner = running = ""
    for line in process.stdout:
        if line.startswith("inject with: "):
            banner = line.removeprefix("inject with: ").strip()
        if "Uvicorn running on" in line:
            running = line
            break
    try:
        argv = shlex.split(banner)
        assert argv[:2] == ["xml-pipeline", "inject"]
        # Pasted elsewhere (no organism.yaml in the working directory), with --port honoured.
        result = run(*argv[1:], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("accepted message ")
        # asyncio's loop by default (uvloop starves some clients under a flood).
        assert running.rstrip().endswith("; event loop: asyncio)"), running
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert any(isinstance(e, OrganismStarted) for e in asyncio.run(events_of(data)))


def test_run_loads_no_http_client_library() -> None:
    # The banner works out the URL to inject at with the client's rules; the server must not
    # pay for the HTTP client (httpx, and the rich and pygments it brings) to do so.
    code = ("import sys; from xml_pipeline.cli import organism; from xml_pipeline.config "
            "import load_organism; from pathlib import Path; "
            "organism._inject_hint(load_organism(Path('organism.yaml')), '127.0.0.1', 9); "
            "print(sorted({'httpx', 'xmlschema'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_run_on_uvloop_when_asked(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", "run", "organism.yaml", "--data",
         str(tmp_path / "events"), "--port", str(free_port()), "--no-watch", "--loop", "uvloop"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    running = next((line for line in process.stdout if "Uvicorn running on" in line), "")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert running.rstrip().endswith("; event loop: uvloop)"), running
    assert process.returncode == 0
