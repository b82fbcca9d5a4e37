"""Where commands look when they are not told: ``./organism.yaml`` and the log it names."""

from __future__ import annotations

import argparse
from pathlib import Path

from xml_pipeline.config import Organism, load_organism
from xml_pipeline.errors import OrganismError

__all__ = ["DEFAULT_DATA", "DEFAULT_ORGANISM", "data_dir", "local_organism"]

DEFAULT_ORGANISM = "organism.yaml"
DEFAULT_DATA = ".xml-pipeline/events"


def local_organism() -> Organism | None:
    """The organism of ``./organism.yaml`` if there is a valid one (for default paths and
    addresses), else None."""
    organism_file = Path(DEFAULT_ORGANISM)
    if not organism_file.exists():
        return None
    try:
        return load_organism(organism_file)
    except OrganismError:
        return None


def data_dir(args: argparse.Namespace) -> Path:
    """The log directory: ``--data``, else the one ``./organism.yaml`` names, else
    ``DEFAULT_DATA``."""
    if args.data:
        return Path(args.data)
    organism = local_organism()
    if organism is not None and organism.log.path is not None:
        return organism.log.path
    return Path(DEFAULT_DATA)
