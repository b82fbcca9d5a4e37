"""The README's first commands work as written: the demo runs a three-hop conversation,
and .ci/run runs exactly the README's test command."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fenced_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r"\s*```sh\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no command block after {marker}"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    command = _fenced_after("<!-- test-command -->")
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'")
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/{found=1; next} found && /^```/ {if (inside) exit; "
                "inside=1; next} inside {print}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == command
    assert 'bash -c "$command"' in (ROOT / ".ci" / "run").read_text()


def test_demo_command_runs_the_demo_conversation(tmp_path: Path) -> None:
    command = _fenced_after("<!-- demo-command -->")
    assert command.endswith(".venv/bin/xml-pipeline run organism.yaml")
    # Run the demo's last step from a copy of the project files (the install is the test's own).
    for name in ("organism.yaml", "schemas", "examples"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, symlinks=False)
        else:
            shutil.copy(source, tmp_path / name)
    cli = [sys.executable, "-m", "xml_pipeline"]
    # The demo's own port may be taken on a developer's machine: the environment overrides
    # organism.yaml for both the server and the client (precedence: flag > env > yaml).
    env = {**os.environ, "XML_PIPELINE_PORT": str(_free_port())}
    process = subprocess.Popen([*cli, "run", "organism.yaml"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "Uvicorn running on" in line or "Application startup complete" in line:
                break
        injected = subprocess.run(
            [*cli, "inject", "--to", "greeter", "<Greeting><name>Alice</name></Greeting>"],
            cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env)
        assert injected.returncode == 0, injected.stderr
        assert injected.stdout.startswith("accepted message ")
        thread = injected.stdout.split()[-1]
        for line in process.stdout:
            if "HELLO, ALICE!" in line:
                assert thread in line
                break
        tail = subprocess.run([*cli, "tail", "--thread", thread, "--json"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30, env=env)
        assert tail.returncode == 0, tail.stderr
        assert tail.stdout.count('"type": "MessageAccepted"') == 3
        # The running organism watches its file: an edit is validated and swapped in.
        base = f"http://127.0.0.1:{env['XML_PIPELINE_PORT']}/api/v1"
        with httpx.Client(timeout=30) as http:
            head = http.get(f"{base}/organism").json()["position"]
            organism_file = tmp_path / "organism.yaml"
            organism_file.write_text(organism_file.read_text().replace(
                "Greets people by name", "Greets people warmly by name"))
            with http.stream("GET", f"{base}/events", params={
                    "after": head, "type": "OrganismReloaded,ReloadRejected"}) as events:
                for line in events.iter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        break
        assert event["type"] == "OrganismReloaded"
        assert event["data"]["updated"] == ["greeter"]
    finally:
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=30)[0]
    assert process.returncode == 0, rest
    assert "stopped" in rest
