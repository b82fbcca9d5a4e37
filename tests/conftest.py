"""Shared factories for the test suite."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from xml_pipeline.log.file import FileLog, open_file_log

ROOT = Path(__file__).resolve().parent.parent

GREETING_XSD = """<?xml version="1.0"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Greeting">
    <xs:complexType><xs:sequence>
      <xs:element name="name" type="xs:string"/>
    </xs:sequence></xs:complexType>
  </xs:element>
</xs:schema>
"""


def write_organism(folder: Path, yaml_text: str, *, schemas: dict[str, str] | None = None,
                   modules: dict[str, str] | None = None) -> Path:
    """Write organism.yaml (dedented) plus schema files and handler modules into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (schemas or {"greeting.xsd": GREETING_XSD}).items():
        path = folder / "schemas" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name, text in (modules or {}).items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    path = folder / "organism.yaml"
    path.write_text(textwrap.dedent(yaml_text))
    return path


@pytest.fixture
def organism_dir(tmp_path: Path) -> Path:
    return tmp_path / "org"


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[FileLog]:
    """A file log in ``tmp_path / "events"``, closed after the test."""
    log = await open_file_log(tmp_path / "events")
    yield log
    await log.aclose()
