"""The organism: what runs, the organism.yaml in force, the fingerprint of its state."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["SCHEMAS"]

SCHEMAS: dict[str, Any] = yaml.safe_load("""
Organism:
  type: object
  required: [name, digest, status, path, started_at, loaded_at, position, listeners, reloads,
             reloads_rejected, last_reload_error]
  properties:
    name: {type: string}
    digest: {type: string}
    status: {$ref: '#/components/schemas/OrganismStatus'}
    path: {type: string}
    started_at: {$ref: '#/components/schemas/Time'}
    loaded_at: {$ref: '#/components/schemas/Time'}
    position: {type: integer, minimum: 0}
    listeners: {type: integer, minimum: 0}
    reloads: {type: integer, minimum: 0}
    reloads_rejected: {type: integer, minimum: 0}
    last_reload_error: {type: string, nullable: true}
OrganismConfig:
  type: object
  required: [path, digest, source]
  properties:
    path: {type: string}
    digest: {type: string}
    source: {type: string}
OrganismState:
  type: object
  required: [position, digest, idle]
  properties:
    position: {type: integer, minimum: 0}
    digest: {type: string}
    idle: {type: boolean}
""")
