"""organism.yaml: the frozen model (``model``), the loader that validates it fully
(``loader``, with ``numbers`` and ``importer``), and the safe YAML it is read with
(``yamlsafe``). The rest of the bus imports these names from here.
"""

from xml_pipeline.config.loader import load_organism, parse_organism
from xml_pipeline.config.model import (
    RESERVED_SENDERS,
    AgentConfig,
    ApiConfig,
    Budget,
    Listener,
    LogConfig,
    Organism,
    Retention,
    RetryPolicy,
)
from xml_pipeline.config.numbers import parse_duration

__all__ = [
    "AgentConfig",
    "ApiConfig",
    "Budget",
    "Listener",
    "LogConfig",
    "Organism",
    "RESERVED_SENDERS",
    "Retention",
    "RetryPolicy",
    "load_organism",
    "parse_duration",
    "parse_organism",
]
