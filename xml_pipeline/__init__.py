"""xml-pipeline: an event-sourced, actor-style message bus with XML envelopes.

This module re-exports what handler authors and embedders need; everything else lives in
its own module.
"""

from xml_pipeline.config import Listener, Organism, load_organism
from xml_pipeline.envelope import Envelope, build_envelope, parse_envelope
from xml_pipeline.errors import (
    EnvelopeError,
    LogError,
    OrganismError,
    PayloadError,
    RoutingError,
    XmlError,
    XmlPipelineError,
)
from xml_pipeline.version import __version__ as __version__
from xml_pipeline.xmlsafe import XmlLimits, parse_xml

__all__ = [
    "Envelope",
    "EnvelopeError",
    "Listener",
    "LogError",
    "Organism",
    "OrganismError",
    "PayloadError",
    "RoutingError",
    "XmlError",
    "XmlLimits",
    "XmlPipelineError",
    "build_envelope",
    "load_organism",
    "parse_envelope",
    "parse_xml",
]
