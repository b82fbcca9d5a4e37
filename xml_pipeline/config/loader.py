"""organism.yaml: loaded once, validated fully, then frozen into an ``Organism``.

``load_organism(path)`` reads the file, checks everything (YAML syntax, unknown keys with a
"did you mean", types and ranges, unique names, schemas that compile, handlers that import,
peers that exist) and raises one ``OrganismError`` listing every problem with file:line.
It raises nothing else for any text, and its work is bounded: the YAML is read by
``yamlsafe`` (limits on nesting, aliases and listed problems), numbers must be finite and in
range, and each schema and handler is loaded once however many listeners name it.
Nothing runs before this succeeds; the pump never reads YAML.

Relative paths (schemas, the log) resolve against the file's own folder, and that folder is
importable for ``handler: module:function``.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from xml_pipeline.config.importer import resolve_handler
from xml_pipeline.config.model import (
    FSYNC_POLICIES,
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
from xml_pipeline.config.numbers import duration, finite
from xml_pipeline.config.yamlsafe import YamlDocument, did_you_mean, show, where
from xml_pipeline.envelope import is_valid_name
from xml_pipeline.errors import OrganismError, Problem, SchemaError
from xml_pipeline.schemas import PayloadSchema, load_schema
from xml_pipeline.xmlsafe import XmlLimits

__all__ = ["load_organism", "parse_organism"]

#: The most workers one listener may have (each is a task the pump keeps for the listener).
MAX_CONCURRENCY = 1024
#: The highest price (USD per million tokens): far above any model's, far below overflow.
MAX_PRICE = 1_000_000

_API_DEFAULTS = ApiConfig()


# --------------------------------------------------------------------------- sections

_TOP = ("organism", "listeners")
_ORGANISM = ("name", "log", "api", "budgets", "limits", "retention")
_LOG = ("path", "url", "fsync", "segment_bytes", "snapshot_every")
_API = ("host", "port", "max_requests", "body_timeout")
_RETENTION = ("ended_threads", "idempotency_keys")
_BUDGETS = ("thread_tokens", "agent_tokens", "organism_tokens")
_LISTENER_BUDGET = ("thread_tokens", "agent_tokens")
_LIMITS = ("max_bytes", "max_depth")
_LISTENER = ("name", "description", "payload", "handler", "agent", "peers", "concurrency",
             "timeout", "retries", "budget")
_AGENT = ("model", "system", "max_tokens", "temperature", "prices")
_PRICES = ("input", "output")
_RETRIES = ("max", "backoff")


class _Doc(YamlDocument):
    """The organism file being loaded, with what one load reads once: schemas and handlers."""

    def __init__(self, file: str) -> None:
        super().__init__(file)
        self.schemas: dict[str, PayloadSchema | SchemaError] = {}
        self.handlers: dict[str, Callable[..., Any] | str] = {}


def _budget(doc: _Doc, value: Any, path: tuple[Any, ...], allowed: tuple[str, ...]) -> Budget:
    raw = doc.mapping(value, path, allowed)
    numbers = {k: doc.whole_number(raw.get(k), (*path, k), minimum=1, default=None)
               for k in allowed}
    return Budget(**numbers)


def _log(doc: _Doc, value: Any, root: Path) -> LogConfig:
    path = ("organism", "log")
    raw = doc.mapping(value, path, _LOG)
    url = doc.text(raw.get("url"), (*path, "url"))
    folder = _file_name(doc, doc.text(raw.get("path"), (*path, "path")), (*path, "path"))
    if url is not None and folder is not None:
        doc.problem(path, "organism.log has both 'path' and 'url'; keep one.")
    if url is not None and not url.startswith(("nats://", "tls://")):
        doc.problem((*path, "url"), f"organism.log.url must start with nats://, not {show(url)}.")
    fsync = raw.get("fsync", "batch")
    if not isinstance(fsync, str) or fsync not in FSYNC_POLICIES:
        hint = did_you_mean(fsync, FSYNC_POLICIES) if isinstance(fsync, str) else ""
        doc.problem((*path, "fsync"), f"organism.log.fsync must be one of "
                                      f"{', '.join(FSYNC_POLICIES)}, not {show(fsync)}.{hint}")
        fsync = "batch"
    segment = doc.whole_number(raw.get("segment_bytes"), (*path, "segment_bytes"),
                               minimum=4096, default=64 * 1024 * 1024)
    snapshot_every = doc.whole_number(raw.get("snapshot_every"), (*path, "snapshot_every"),
                                      minimum=0, default=100_000)
    log_path = None if url else (root / (folder or ".xml-pipeline/events"))
    return LogConfig(path=log_path, url=url, fsync=fsync, segment_bytes=segment or 0,
                     snapshot_every=snapshot_every or 0)


def _import_handler(doc: _Doc, ref: str, path: tuple[Any, ...], root: Path
                    ) -> Callable[..., Any] | None:
    found = doc.handlers.get(ref)
    if found is None:  # each reference is resolved once per load, however often it is used
        found = doc.handlers[ref] = resolve_handler(ref, root)
    if isinstance(found, str):
        doc.problem(path, found)
        return None
    return found


def _file_name(doc: _Doc, value: str | None, path: tuple[Any, ...]) -> str | None:
    """``value`` if it can name a file; a NUL character cannot (the OS would refuse it)."""
    if value is not None and "\0" in value:
        doc.problem(path, f"{where(path)} {show(value)} holds a NUL character, which no file "
                          "name can; remove it.")
        return None
    return value


def _payload_schema(doc: _Doc, payload: str, path: tuple[Any, ...], file_dir: Path
                    ) -> PayloadSchema | None:
    found = doc.schemas.get(payload)
    if found is None:  # each file is compiled once per load, however many listeners use it
        target = file_dir / payload
        try:
            mode = target.stat().st_mode
        except OSError:  # load_schema says why it cannot be read
            mode = stat.S_IFREG
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            # A device or a pipe (/dev/zero, /dev/stdin) could be read forever.
            doc.problem(path, f"payload {show(payload)} is not a file but a device or a pipe; "
                              "point 'payload' at an XSD file.")
            return None
        try:
            found = load_schema(target)
        except SchemaError as exc:
            found = exc
        doc.schemas[payload] = found
    if isinstance(found, SchemaError):
        doc.problem(path, f"payload {show(payload)}: {found.message}")
        if found.problem.line is not None and not doc.full:  # also point into the XSD itself
            doc.problems.append(found.problem)
        return None
    return found


def _listener(doc: _Doc, raw: Any, index: int, root: Path, file_dir: Path) -> Listener | None:
    path: tuple[Any, ...] = ("listeners", index)
    value = doc.mapping(raw, path, _LISTENER)
    if not value:
        if raw is not None and not isinstance(raw, dict):
            return None
        doc.problem(path, f"listeners[{index}] is empty; give it at least name, description "
                          "and payload.")
        return None
    name = doc.text(value.get("name"), (*path, "name"), required=True)
    if name is not None and not is_valid_name(name):
        doc.problem((*path, "name"), f"Listener name {show(name)} must start with a letter "
                                     "and hold only letters, digits, '_', '-' or '.' "
                                     "(64 at most).")
    elif name in RESERVED_SENDERS:
        doc.problem((*path, "name"), f"Listener name {show(name)} is reserved for the bus; "
                                     "choose another.")
    description = doc.text(value.get("description"), (*path, "description"), required=True)
    schema: PayloadSchema | None = None
    payload = _file_name(doc, doc.text(value.get("payload"), (*path, "payload"),
                                       required=True), (*path, "payload"))
    if payload is not None:
        schema = _payload_schema(doc, payload, (*path, "payload"), file_dir)
    handler = doc.text(value.get("handler"), (*path, "handler"))
    handler_fn = None
    agent = None
    if "agent" in value:
        agent = _agent(doc, value["agent"], (*path, "agent"))
    if handler is not None and "agent" in value:
        doc.problem(path, f"Listener {show(name)} has both 'handler' and 'agent'; keep one.")
    elif handler is None and "agent" not in value:
        doc.problem(path, f"Listener {show(name)} needs a 'handler: module:function' or an "
                          "'agent:' block.")
    if handler is not None:
        handler_fn = _import_handler(doc, handler, (*path, "handler"), root)
    peers_raw = value.get("peers")
    peers: list[str] = []
    if peers_raw is not None:
        if not isinstance(peers_raw, list) or not all(isinstance(p, str) for p in peers_raw):
            doc.problem((*path, "peers"), "peers must be a list of listener names, "
                                          f"not {show(peers_raw)}.")
        else:
            peers = peers_raw
    retries_raw = doc.mapping(value.get("retries"), (*path, "retries"), _RETRIES)
    retries = RetryPolicy(
        max=doc.whole_number(retries_raw.get("max"), (*path, "retries", "max"), minimum=0,
                             default=0) or 0,
        backoff=duration(doc, retries_raw.get("backoff"), (*path, "retries", "backoff"), 1.0),
    )
    concurrency = doc.whole_number(value.get("concurrency"), (*path, "concurrency"),
                                   minimum=1, maximum=MAX_CONCURRENCY, default=1) or 1
    timeout = duration(doc, value.get("timeout"), (*path, "timeout"), 30.0)
    budget = _budget(doc, value.get("budget"), (*path, "budget"), _LISTENER_BUDGET)
    if name is None or description is None or schema is None:
        return None
    return Listener(
        name=name,
        description=description,
        schema=schema,
        peers=tuple(peers),
        handler=handler,
        handler_fn=handler_fn,
        agent=agent,
        concurrency=concurrency,
        timeout=timeout,
        retries=retries,
        budget=budget,
        line=doc.line(path),
    )


def _agent(doc: _Doc, raw: Any, path: tuple[Any, ...]) -> AgentConfig | None:
    value = doc.mapping(raw, path, _AGENT)
    model = doc.text(value.get("model"), (*path, "model"), required=True)
    system = doc.text(value.get("system"), (*path, "system"), required=True)
    max_tokens = doc.whole_number(value.get("max_tokens"), (*path, "max_tokens"), minimum=1,
                                  default=1024)
    temperature = value.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 1
    ):
        doc.problem((*path, "temperature"), "agent.temperature must be a number from 0 to 1, "
                                            f"not {show(temperature)}.")
        temperature = None
    prices = doc.mapping(value.get("prices"), (*path, "prices"), _PRICES)
    price: dict[str, float | None] = {}
    for key in _PRICES:
        raw = prices.get(key)
        number = None
        if raw is not None:
            if not isinstance(raw, bool) and isinstance(raw, int | float):
                number = finite(raw)
            if number is None or not 0 <= number <= MAX_PRICE:
                doc.problem((*path, "prices", key), f"agent.prices.{key} must be a price in USD "
                                                    f"per million tokens (a number from 0 to "
                                                    f"{MAX_PRICE:,}), not {show(raw)}.")
                number = None
        price[key] = number
    if model is None or system is None:
        return None
    return AgentConfig(model=model, system=system, max_tokens=max_tokens or 1024,
                       temperature=None if temperature is None else float(temperature),
                       price_input=price["input"], price_output=price["output"])


def load_organism(path: str | Path) -> Organism:
    """Load and fully validate an organism file. Raises ``OrganismError`` with every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OrganismError([Problem(file=str(file), line=None,
                                     message=f"Cannot read the organism file: {exc}.")]) from exc
    return parse_organism(text, path=file)


def parse_organism(text: str, *, path: Path) -> Organism:
    """Validate organism YAML ``text`` as if read from ``path`` (which anchors relative paths)."""
    doc = _Doc(str(path))
    data = doc.read(text)
    if doc.empty:
        raise OrganismError([Problem(file=str(path), line=1, message=(
            "The file is empty; it needs an 'organism:' section and a 'listeners:' list."))])
    file_dir = path.resolve().parent
    top = doc.mapping(data, (), _TOP)
    org = doc.mapping(top.get("organism"), ("organism",), _ORGANISM)
    if "organism" not in top:
        doc.problem((), "The 'organism:' section is missing; add 'organism: {name: my-organism}'.")
    name = doc.text(org.get("name"), ("organism", "name"), required="organism" in top) or ""
    log = _log(doc, org.get("log"), file_dir)
    api_raw = doc.mapping(org.get("api"), ("organism", "api"), _API)
    host = doc.text(api_raw.get("host"), ("organism", "api", "host")) or "127.0.0.1"
    port = doc.whole_number(api_raw.get("port"), ("organism", "api", "port"), minimum=0,
                            maximum=65535, default=8765)
    max_requests = doc.whole_number(api_raw.get("max_requests"),
                                    ("organism", "api", "max_requests"), minimum=1,
                                    default=_API_DEFAULTS.max_requests)
    body_timeout = duration(doc, api_raw.get("body_timeout"), ("organism", "api", "body_timeout"),
                             _API_DEFAULTS.body_timeout, positive=True)
    retention_raw = doc.mapping(org.get("retention"), ("organism", "retention"), _RETENTION)
    defaults = Retention().summary()
    retention = Retention(**{
        key: doc.whole_number(retention_raw.get(key), ("organism", "retention", key),
                              minimum=0, default=defaults[key]) or 0 for key in _RETENTION})
    budgets = _budget(doc, org.get("budgets"), ("organism", "budgets"), _BUDGETS)
    limits_raw = doc.mapping(org.get("limits"), ("organism", "limits"), _LIMITS)
    limits = XmlLimits(
        max_bytes=doc.whole_number(limits_raw.get("max_bytes"),
                                   ("organism", "limits", "max_bytes"),
                                   minimum=256, default=1_048_576) or 1_048_576,
        max_depth=min(doc.whole_number(limits_raw.get("max_depth"),
                                       ("organism", "limits", "max_depth"),
                                       minimum=2, default=64) or 64, 255),
    )
    raw_listeners = top.get("listeners")
    if raw_listeners is None:
        doc.problem((), "The 'listeners:' list is missing; declare at least one listener.")
        raw_listeners = []
    elif not isinstance(raw_listeners, list):
        doc.problem(("listeners",), "listeners must be a list ('- name: ...' items).")
        raw_listeners = []
    listeners: dict[str, Listener] = {}
    for index, raw in enumerate(raw_listeners):
        listener = _listener(doc, raw, index, file_dir, file_dir)
        if listener is None:
            continue
        if listener.name in listeners:
            first = listeners[listener.name].line
            doc.problem(("listeners", index, "name"), f"Listener name {show(listener.name)} is "
                                                      f"already used on line {first}; "
                                                      "names must be unique.")
            continue
        listeners[listener.name] = listener
    names = {raw["name"]: None for raw in raw_listeners
             if isinstance(raw, dict) and isinstance(raw.get("name"), str)}
    for index, raw in enumerate(raw_listeners):
        if not isinstance(raw, dict) or not isinstance(raw.get("peers"), list):
            continue
        for j, peer in enumerate(raw["peers"]):
            if not isinstance(peer, str) or peer in names:
                continue
            if doc.full:  # no "did you mean" for problems that will not be listed
                doc.unlisted += 1
            else:
                doc.problem(("listeners", index, "peers", j),
                            f"Listener {show(raw.get('name'))} sends to {show(peer)}, which "
                            f"this organism does not declare.{did_you_mean(peer, names)}")
    if doc.problems:
        raise OrganismError(doc.listed())
    digest = hashlib.sha256(text.encode("utf-8"))
    for listener in listeners.values():
        digest.update(listener.schema.digest.encode("ascii"))
    return Organism(
        name=name, path=path, root=file_dir, source=text, digest=digest.hexdigest(), log=log,
        api=ApiConfig(host=host, port=port if port is not None else 8765,
                      max_requests=max_requests or _API_DEFAULTS.max_requests,
                      body_timeout=body_timeout),
        retention=retention,
        budgets=budgets,
        limits=limits,
        listeners=MappingProxyType(listeners),
    )
