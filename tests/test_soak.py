"""The load soak of ``benchmarks/soak.py``, shortened to seconds: the script runs end to end,
and above capacity the server answers only 202, 429 or 503, with no transport error."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_a_short_soak_runs_and_refuses_overload_with_429_or_503() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.05",
         "--probe-seconds", "2", "--burst-seconds", "2", "--recovery-seconds", "2",
         "--burst-clients", "64"],
        capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    answers = dict(re.findall(r"^(\w+)\s+\d+ answers in .*?s: (.*)$", output, re.MULTILINE))
    assert set(answers) == {"capacity", "steady", "burst", "polite", "recovery"}, output
    for phase, line in answers.items():
        statuses = set(re.findall(r"(\d{3}): \d+", line))
        assert statuses <= {"202", "429", "503"}, (phase, line)
        assert "transport errors" not in line, (phase, line)
    assert set(re.findall(r"(\d{3}): \d+", answers["steady"])) == {"202"}
    assert "429" in answers["burst"]  # far above capacity: refused, not queued
    assert "server memory (RSS MiB)" in output
