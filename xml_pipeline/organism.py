"""organism.yaml: loaded once, validated fully, then frozen into an ``Organism``.

``load_organism(path)`` reads the file, checks everything (YAML syntax, unknown keys with a
"did you mean", types and ranges, unique names, schemas that compile, handlers that import,
peers that exist) and raises one ``OrganismError`` listing every problem with file:line.
Nothing runs before this succeeds; the pump never reads YAML.

Relative paths (schemas, the log) resolve against the file's own folder, and that folder is
importable for ``handler: module:function``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import yaml

from xml_pipeline.envelope import is_valid_name
from xml_pipeline.errors import OrganismError, Problem, SchemaError
from xml_pipeline.schemas import PayloadSchema, load_schema
from xml_pipeline.xmlsafe import XmlLimits

__all__ = [
    "AgentConfig",
    "ApiConfig",
    "Budget",
    "Listener",
    "LogConfig",
    "Organism",
    "RESERVED_SENDERS",
    "RetryPolicy",
    "load_organism",
    "parse_duration",
]

#: Senders the bus uses for messages that no listener sent; no listener may take these names.
RESERVED_SENDERS = frozenset({"api", "cli", "system"})
FSYNC_POLICIES = ("always", "batch", "never")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max: int = 0  # retries after the first attempt
    backoff: float = 1.0  # seconds before the first retry; doubles each time


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """Token limits; ``None`` means no limit at that scope."""

    thread_tokens: int | None = None
    agent_tokens: int | None = None
    organism_tokens: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    model: str
    system: str
    max_tokens: int = 1024
    temperature: float | None = None
    #: USD per million tokens, overriding the built-in price table for this agent
    price_input: float | None = None
    price_output: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    path: Path | None = None
    url: str | None = None
    fsync: str = "batch"
    segment_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8765


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Listener:
    name: str
    description: str
    schema: PayloadSchema
    peers: tuple[str, ...]
    handler: str | None = None  # "module:function"
    handler_fn: Callable[..., Any] | None = field(default=None, repr=False)
    agent: AgentConfig | None = None
    concurrency: int = 1
    timeout: float = 30.0
    retries: RetryPolicy = RetryPolicy()
    budget: Budget = Budget()
    line: int | None = None

    def summary(self) -> dict[str, Any]:
        """The listener's configuration as plain data (recorded in the log, shown by the API)."""
        return {
            "name": self.name,
            "description": self.description,
            "payload": str(self.schema.path),
            "payload_type": self.schema.root,
            "payload_namespace": self.schema.namespace,
            "schema_digest": self.schema.digest,
            "handler": self.handler,
            "agent": None
            if self.agent is None
            else {
                "model": self.agent.model,
                "system": self.agent.system,
                "max_tokens": self.agent.max_tokens,
                "temperature": self.agent.temperature,
                "prices": {"input": self.agent.price_input, "output": self.agent.price_output},
            },
            "peers": list(self.peers),
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "retries": {"max": self.retries.max, "backoff": self.retries.backoff},
            "budget": {
                "thread_tokens": self.budget.thread_tokens,
                "agent_tokens": self.budget.agent_tokens,
            },
        }


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Organism:
    name: str
    path: Path
    root: Path
    source: str
    digest: str
    log: LogConfig
    api: ApiConfig
    budgets: Budget
    limits: XmlLimits
    listeners: Mapping[str, Listener]


# --------------------------------------------------------------------------- YAML with lines


class _Doc:
    """Plain values from YAML plus the line of every value and key, addressed by path."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[tuple[Any, ...], int] = {}
        self.problems: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def convert(self, node: yaml.Node, path: tuple[Any, ...] = ()) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    self.problem(path, f"Keys must be text, not {key!r}.")
                    continue
                if key in result:
                    first = self.lines.get((*path, key))
                    self.problem(
                        path,
                        f"The key '{key}' appears twice (first on line {first}); keep one.",
                        line=key_node.start_mark.line + 1,
                    )
                result[key] = self.convert(value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._constructor.construct_object(node, deep=True)

    def line(self, path: tuple[Any, ...]) -> int | None:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)

    def problem(self, path: tuple[Any, ...], message: str, *, line: int | None = None) -> None:
        self.problems.append(
            Problem(file=self.file, line=line if line is not None else self.line(path),
                    message=message)
        )


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _where(path: tuple[Any, ...]) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out or "the top level"


def _check_keys(doc: _Doc, value: dict[str, Any], path: tuple[Any, ...], allowed: tuple[str, ...]
                ) -> None:
    for key in value:
        if key not in allowed:
            doc.problem(
                (*path, key),
                f"Unknown key '{key}' in {_where(path)}.{_did_you_mean(key, allowed)} "
                f"Allowed keys: {', '.join(allowed)}.",
            )


def _mapping(doc: _Doc, value: Any, path: tuple[Any, ...], allowed: tuple[str, ...]
             ) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        doc.problem(path, f"{_where(path)} must be a mapping (key: value lines), "
                          f"not {type(value).__name__}.")
        return {}
    _check_keys(doc, value, path, allowed)
    return value


def _int(doc: _Doc, value: Any, path: tuple[Any, ...], *, minimum: int, default: int | None
         ) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        doc.problem(path, f"{_where(path)} must be a whole number of at least {minimum}, "
                          f"not {value!r}.")
        return default
    return value


def _text(doc: _Doc, value: Any, path: tuple[Any, ...], *, required: bool = False
          ) -> str | None:
    if value is None:
        if required:
            doc.problem(path, f"{_where(path)} is required.")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        doc.problem(path, f"{_where(path)} must be non-empty text, not {value!r}.")
        return None
    return value


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``30``, ``1.5``, ``"500ms"``, ``"30s"``, ``"2m"`` or ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(value)
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(value)
    return float(match.group(1)) * _UNITS[match.group(2)]


def _duration(doc: _Doc, value: Any, path: tuple[Any, ...], default: float) -> float:
    if value is None:
        return default
    try:
        return parse_duration(value)
    except ValueError:
        doc.problem(path, f"{_where(path)} must be a duration such as 30s, 500ms or 2m, "
                          f"not {value!r}.")
        return default


# --------------------------------------------------------------------------- sections

_TOP = ("organism", "listeners")
_ORGANISM = ("name", "log", "api", "budgets", "limits")
_LOG = ("path", "url", "fsync", "segment_bytes")
_API = ("host", "port")
_BUDGETS = ("thread_tokens", "agent_tokens", "organism_tokens")
_LISTENER_BUDGET = ("thread_tokens", "agent_tokens")
_LIMITS = ("max_bytes", "max_depth")
_LISTENER = ("name", "description", "payload", "handler", "agent", "peers", "concurrency",
             "timeout", "retries", "budget")
_AGENT = ("model", "system", "max_tokens", "temperature", "prices")
_PRICES = ("input", "output")
_RETRIES = ("max", "backoff")


def _budget(doc: _Doc, value: Any, path: tuple[Any, ...], allowed: tuple[str, ...]) -> Budget:
    raw = _mapping(doc, value, path, allowed)
    numbers = {k: _int(doc, raw.get(k), (*path, k), minimum=1, default=None) for k in allowed}
    return Budget(**numbers)


def _log(doc: _Doc, value: Any, root: Path) -> LogConfig:
    path = ("organism", "log")
    raw = _mapping(doc, value, path, _LOG)
    url = _text(doc, raw.get("url"), (*path, "url"))
    where = _text(doc, raw.get("path"), (*path, "path"))
    if url is not None and where is not None:
        doc.problem(path, "organism.log has both 'path' and 'url'; keep one.")
    if url is not None and not url.startswith(("nats://", "tls://")):
        doc.problem((*path, "url"), f"organism.log.url must start with nats://, not {url!r}.")
    fsync = raw.get("fsync", "batch")
    if fsync not in FSYNC_POLICIES:
        doc.problem((*path, "fsync"), f"organism.log.fsync must be one of "
                                      f"{', '.join(FSYNC_POLICIES)}, not {fsync!r}."
                                      f"{_did_you_mean(str(fsync), FSYNC_POLICIES)}")
        fsync = "batch"
    segment = _int(doc, raw.get("segment_bytes"), (*path, "segment_bytes"), minimum=4096,
                   default=64 * 1024 * 1024)
    log_path = None if url else (root / (where or ".xml-pipeline/events"))
    return LogConfig(path=log_path, url=url, fsync=fsync, segment_bytes=segment or 0)


#: module name -> digest of its source file when it was (re)imported by a load
_module_digests: dict[str, str] = {}


def _file_digest(module: ModuleType) -> str | None:
    source = getattr(module, "__file__", None)
    if not source:
        return None
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except OSError:
        return None


def _import_fresh(name: str) -> ModuleType:
    """Import a handler module; if it was imported before and its file changed since, reload
    it, so that a reload of organism.yaml picks up edited handler code. Only the named module
    is reloaded, not modules it imports."""
    module = sys.modules.get(name)
    if module is None:
        module = importlib.import_module(name)
    else:
        digest = _file_digest(module)
        if digest is not None and _module_digests.get(name) not in (None, digest):
            module = importlib.reload(module)
    digest = _file_digest(module)
    if digest is not None:
        _module_digests[name] = digest
    return module


def _import_handler(doc: _Doc, ref: str, path: tuple[Any, ...], root: Path
                    ) -> Callable[..., Any] | None:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        doc.problem(path, f"handler {ref!r} must be written 'module:function', "
                          "for example examples.hello:greet.")
        return None
    folder = str(root)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = _import_fresh(module_name)
    except ModuleNotFoundError as exc:
        doc.problem(path, f"handler {ref!r}: cannot import module '{module_name}' ({exc}); "
                          f"module paths are relative to {folder}.")
        return None
    except Exception as exc:  # any error raised while importing the operator's code
        doc.problem(path, f"handler {ref!r}: importing '{module_name}' raised "
                          f"{type(exc).__name__}: {exc}.")
        return None
    fn = getattr(module, attr, None)
    if fn is None:
        public = [n for n in vars(module) if not n.startswith("_")]
        doc.problem(path, f"handler {ref!r}: module '{module_name}' has no '{attr}'."
                          f"{_did_you_mean(attr, public)}")
        return None
    if not inspect.iscoroutinefunction(fn):
        doc.problem(path, f"handler {ref!r} must be an 'async def' function taking "
                          "(payload, ctx).")
        return None
    return fn


def _listener(doc: _Doc, raw: Any, index: int, root: Path, file_dir: Path) -> Listener | None:
    path: tuple[Any, ...] = ("listeners", index)
    value = _mapping(doc, raw, path, _LISTENER)
    if not value:
        if raw is not None and not isinstance(raw, dict):
            return None
        doc.problem(path, f"listeners[{index}] is empty; give it at least name, description "
                          "and payload.")
        return None
    name = _text(doc, value.get("name"), (*path, "name"), required=True)
    if name is not None and not is_valid_name(name):
        doc.problem((*path, "name"), f"Listener name {name!r} must start with a letter and hold "
                                     "only letters, digits, '_', '-' or '.' (64 at most).")
    elif name in RESERVED_SENDERS:
        doc.problem((*path, "name"), f"Listener name {name!r} is reserved for the bus; "
                                     "choose another.")
    description = _text(doc, value.get("description"), (*path, "description"), required=True)
    schema: PayloadSchema | None = None
    payload = _text(doc, value.get("payload"), (*path, "payload"), required=True)
    if payload is not None:
        try:
            schema = load_schema(file_dir / payload)
        except SchemaError as exc:
            doc.problem((*path, "payload"), f"payload {payload!r}: {exc.message}")
            if exc.problem.line is not None:  # also point into the XSD itself
                doc.problems.append(exc.problem)
    handler = _text(doc, value.get("handler"), (*path, "handler"))
    handler_fn = None
    agent = None
    if "agent" in value:
        agent = _agent(doc, value["agent"], (*path, "agent"))
    if handler is not None and "agent" in value:
        doc.problem(path, f"Listener {name!r} has both 'handler' and 'agent'; keep one.")
    elif handler is None and "agent" not in value:
        doc.problem(path, f"Listener {name!r} needs a 'handler: module:function' or an "
                          "'agent:' block.")
    if handler is not None:
        handler_fn = _import_handler(doc, handler, (*path, "handler"), root)
    peers_raw = value.get("peers")
    peers: list[str] = []
    if peers_raw is not None:
        if not isinstance(peers_raw, list) or not all(isinstance(p, str) for p in peers_raw):
            doc.problem((*path, "peers"), "peers must be a list of listener names, "
                                          f"not {peers_raw!r}.")
        else:
            peers = peers_raw
    retries_raw = _mapping(doc, value.get("retries"), (*path, "retries"), _RETRIES)
    retries = RetryPolicy(
        max=_int(doc, retries_raw.get("max"), (*path, "retries", "max"), minimum=0,
                 default=0) or 0,
        backoff=_duration(doc, retries_raw.get("backoff"), (*path, "retries", "backoff"), 1.0),
    )
    concurrency = _int(doc, value.get("concurrency"), (*path, "concurrency"), minimum=1,
                       default=1) or 1
    timeout = _duration(doc, value.get("timeout"), (*path, "timeout"), 30.0)
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
    value = _mapping(doc, raw, path, _AGENT)
    model = _text(doc, value.get("model"), (*path, "model"), required=True)
    system = _text(doc, value.get("system"), (*path, "system"), required=True)
    max_tokens = _int(doc, value.get("max_tokens"), (*path, "max_tokens"), minimum=1,
                      default=1024)
    temperature = value.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 1
    ):
        doc.problem((*path, "temperature"), "agent.temperature must be a number from 0 to 1, "
                                            f"not {temperature!r}.")
        temperature = None
    prices = _mapping(doc, value.get("prices"), (*path, "prices"), _PRICES)
    price: dict[str, float | None] = {}
    for key in _PRICES:
        raw = prices.get(key)
        if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int | float)
                                or raw < 0):
            doc.problem((*path, "prices", key), f"agent.prices.{key} must be a price in USD per "
                                                f"million tokens (a number), not {raw!r}.")
            raw = None
        price[key] = None if raw is None else float(raw)
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
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{reason} ({context})" if context else str(reason)
        raise OrganismError([Problem(file=str(path), line=mark.line + 1 if mark else None,
                                     message=f"This is not valid YAML: {detail}.")]) from exc
    if node is None:
        raise OrganismError([Problem(file=str(path), line=1, message=(
            "The file is empty; it needs an 'organism:' section and a 'listeners:' list."))])
    try:
        data = doc.convert(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise OrganismError([Problem(file=str(path), line=mark.line + 1 if mark else None,
                                     message=f"This is not valid YAML: {exc}.")]) from exc
    file_dir = path.resolve().parent
    top = _mapping(doc, data, (), _TOP)
    org = _mapping(doc, top.get("organism"), ("organism",), _ORGANISM)
    if "organism" not in top:
        doc.problem((), "The 'organism:' section is missing; add 'organism: {name: my-organism}'.")
    name = _text(doc, org.get("name"), ("organism", "name"), required="organism" in top) or ""
    log = _log(doc, org.get("log"), file_dir)
    api_raw = _mapping(doc, org.get("api"), ("organism", "api"), _API)
    host = _text(doc, api_raw.get("host"), ("organism", "api", "host")) or "127.0.0.1"
    port = _int(doc, api_raw.get("port"), ("organism", "api", "port"), minimum=0, default=8765)
    if port is not None and port > 65535:
        doc.problem(("organism", "api", "port"), f"organism.api.port must be at most 65535, "
                                                 f"not {port}.")
    budgets = _budget(doc, org.get("budgets"), ("organism", "budgets"), _BUDGETS)
    limits_raw = _mapping(doc, org.get("limits"), ("organism", "limits"), _LIMITS)
    limits = XmlLimits(
        max_bytes=_int(doc, limits_raw.get("max_bytes"), ("organism", "limits", "max_bytes"),
                       minimum=256, default=1_048_576) or 1_048_576,
        max_depth=min(_int(doc, limits_raw.get("max_depth"), ("organism", "limits", "max_depth"),
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
            doc.problem(("listeners", index, "name"), f"Listener name {listener.name!r} is "
                                                      f"already used on line {first}; "
                                                      "names must be unique.")
            continue
        listeners[listener.name] = listener
    names = [raw["name"] for raw in raw_listeners
             if isinstance(raw, dict) and isinstance(raw.get("name"), str)]
    for index, raw in enumerate(raw_listeners):
        if not isinstance(raw, dict) or not isinstance(raw.get("peers"), list):
            continue
        for j, peer in enumerate(raw["peers"]):
            if isinstance(peer, str) and peer not in names:
                doc.problem(("listeners", index, "peers", j),
                            f"Listener {raw.get('name')!r} sends to {peer!r}, which this "
                            f"organism does not declare.{_did_you_mean(peer, names)}")
    if doc.problems:
        raise OrganismError(doc.problems)
    digest = hashlib.sha256(text.encode("utf-8"))
    for listener in listeners.values():
        digest.update(listener.schema.digest.encode("ascii"))
    return Organism(
        name=name,
        path=path,
        root=file_dir,
        source=text,
        digest=digest.hexdigest(),
        log=log,
        api=ApiConfig(host=host, port=port if port is not None else 8765),
        budgets=budgets,
        limits=limits,
        listeners=MappingProxyType(listeners),
    )
