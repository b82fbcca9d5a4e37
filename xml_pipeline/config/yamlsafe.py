"""YAML read safely for configuration: plain values, the line of each, and bounded work.

``YamlDocument.read(text)`` parses with PyYAML's safe loader and converts the nodes itself, so
that every value and key keeps its line and nothing the file says can cost more than a bound:

- nesting deeper than ``MAX_NESTING`` is refused (PyYAML's composer recurses per level, so a
  deep file would otherwise end in ``RecursionError``);
- aliases are followed (merge keys ``<<`` included), but an alias inside its own block is a
  problem, and a file that stands for more than ``MAX_VALUES`` values once its aliases are
  written out ("billion laughs") is refused;
- a value PyYAML cannot construct (a bad date, ``!!int abc``, a 5,000-digit number) or a tag
  other than the plain ones is a problem on its line, never another exception;
- at most ``MAX_PROBLEMS`` problems are listed; the rest are counted.

Problems are collected as ``Problem`` (file:line, a sentence); what cannot be read at all
raises ``OrganismError`` with one problem. The checks of single values (``mapping``,
``whole_number``, ``text``) add problems and return a default instead of raising.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from typing import Any

import yaml

from xml_pipeline.errors import OrganismError, Problem

__all__ = [
    "MAX_NESTING",
    "MAX_PROBLEMS",
    "MAX_VALUES",
    "YamlDocument",
    "did_you_mean",
    "show",
    "where",
]

#: Bounds that keep a broken or hostile file from using up time or memory. PyYAML's composer
#: recurses once per nesting level, and an alias stands for its whole block again wherever it
#: is used, so a few lines of aliases of aliases can stand for billions of values.
MAX_NESTING = 64
MAX_VALUES = 100_000
MAX_PROBLEMS = 100

_YAML_TAG = "tag:yaml.org,2002:"
_MERGE = _YAML_TAG + "merge"
_COLLECTION_TAGS = {yaml.MappingNode: _YAML_TAG + "map", yaml.SequenceNode: _YAML_TAG + "seq"}
#: The longest number (in characters) read from the file; no setting needs more.
_MAX_NUMBER_CHARS = 400
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


class _TooLargeError(Exception):
    """The file is nested too deeply or expands to too many values (one whole-file problem)."""

    def __init__(self, message: str, *, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` whose composer refuses nesting deeper than ``MAX_NESTING``: it recurses
    per level, so a deep file would otherwise end in ``RecursionError``."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                line = self.peek_event().start_mark.line + 1
                raise _TooLargeError(
                    f"The block on line {line} is nested more than {MAX_NESTING} levels deep; "
                    "an organism needs a handful of levels, so flatten this part of the file.",
                    line=line)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlong = 40
_SHORT.maxlevel = 3


def show(value: Any) -> str:
    """``repr`` of a value from the file, shortened: a message must not repeat a whole file."""
    return _SHORT.repr(value)


def _tag(tag: str) -> str:
    return "!!" + tag[len(_YAML_TAG):] if tag.startswith(_YAML_TAG) else tag


class YamlDocument:
    """Plain values from YAML plus the line of every value and key, addressed by path.

    Conversion follows aliases (merge keys ``<<`` included) but refuses an alias inside its
    own block, counts every value it produces (``MAX_VALUES``), and turns every value PyYAML
    cannot construct (a bad date, an unknown tag, ``!!int abc``) into a problem on its line.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[tuple[Any, ...], int] = {}
        self.problems: list[Problem] = []
        self.unlisted = 0  # problems beyond MAX_PROBLEMS
        self.empty = False
        self._constructor = yaml.constructor.SafeConstructor()
        self._values = 0
        self._open: set[int] = set()  # the collections being converted (to find loops)
        #: values that could not be read: their problem is listed, so none is added about
        #: them (no "is required" after "cannot be read")
        self.broken: set[tuple[Any, ...]] = set()

    def read(self, text: str) -> Any:
        """The plain value of the one document in ``text`` (None, and ``empty`` set, if it
        holds none: nothing, or only comments). Raises
        ``OrganismError`` with one problem if the text is not YAML or is too large."""
        try:
            node = yaml.compose(text, Loader=_Loader)
            self.empty = node is None
            return None if node is None else self.convert(node)
        except _TooLargeError as exc:
            raise OrganismError([Problem(file=self.file, line=exc.line, message=exc.message)]
                                ) from None
        except yaml.YAMLError as exc:
            raise OrganismError([_yaml_problem(self.file, text, exc)]) from exc

    def convert(self, node: yaml.Node, path: tuple[Any, ...] = (), *, line: int | None = None
                ) -> Any:
        here = node.start_mark.line + 1
        if id(node) in self._open:
            self.lines[path] = line or here
            self.problem(path, f"{where(path)} (line {line or here}) is an alias of a block "
                               "that contains it, which would never end; write the values out "
                               "instead of the alias.")
            self.broken.add(path)
            return None
        self._values += 1
        if self._values > MAX_VALUES:
            raise _TooLargeError(
                f"The file stands for more than {MAX_VALUES} values once its aliases are "
                f"written out (the count ran out at line {here}); an organism needs far fewer, "
                "so use fewer aliases of large blocks.", line=here)
        self.lines[path] = here
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if node.tag != _COLLECTION_TAGS[type(node)]:
                self.problem(path, f"The tag {show(_tag(node.tag))} on line {here} is not "
                                   "allowed; an organism holds plain text, numbers, booleans, "
                                   "lists and mappings, so remove the tag.")
            self._open.add(id(node))
            try:
                if isinstance(node, yaml.SequenceNode):
                    return [self.convert(item, (*path, i), line=here)
                            for i, item in enumerate(node.value)]
                return self._mapping(node, path)
            finally:
                self._open.discard(id(node))
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: tuple[Any, ...]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                merged.update({k: v for k, v in self._merge(value_node, path, key_line).items()
                               if k not in merged})
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            if key in result:
                first = self.lines.get((*path, key))
                self.problem(path, f"The key {show(key)} appears twice (first on line {first}); "
                                   "keep one.", line=key_line)
            result[key] = self.convert(value_node, (*path, key), line=key_line)
        self.lines[path] = node.start_mark.line + 1  # a merge converted its source at ``path``
        for key, value in merged.items():
            result.setdefault(key, value)
        return result

    def _merge(self, node: yaml.Node, path: tuple[Any, ...], line: int) -> dict[str, Any]:
        """The keys a merge key ``<<`` brings in: earlier sources win, as in YAML 1.1."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not all(isinstance(source, yaml.MappingNode) for source in sources):
            self.problem(path, f"The merge key '<<' on line {line} takes a mapping (such as "
                               "*defaults) or a list of them; write the keys out instead.",
                         line=line)
            return {}
        merged: dict[str, Any] = {}
        for source in sources:
            value = self.convert(source, path, line=line)
            if isinstance(value, dict):
                merged.update({k: v for k, v in value.items() if k not in merged})
        return merged

    def _key(self, node: yaml.Node, path: tuple[Any, ...]) -> str | None:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.ScalarNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
            self.problem(path, f"Keys must be text, not {kind} (line {line}); write the key as "
                               "a plain word.", line=line)
            return None
        key = self._scalar(node, path, line=line, key=True)
        if not isinstance(key, str):
            if key is not None or node.tag == _YAML_TAG + "null":
                self.problem(path, f"Keys must be text, not {show(key)}; write the key as a "
                                   "plain word.", line=line)
            return None
        return key

    def _scalar(self, node: yaml.Node, path: tuple[Any, ...], *, line: int | None = None,
                key: bool = False) -> Any:
        line = line or node.start_mark.line + 1
        message = None
        value = None
        if node.tag not in self._constructor.yaml_constructors:
            message = (f"The tag {show(_tag(node.tag))} on line {line} is not allowed; an "
                       "organism holds plain text, numbers, booleans, lists and mappings, so "
                       "remove the tag.")
        elif node.tag in (_YAML_TAG + "int", _YAML_TAG + "float") and (
                len(node.value) > _MAX_NUMBER_CHARS):
            message = (f"The number on line {line} is {len(node.value)} characters long; no "
                       "setting takes a number that large, so shorten it (or quote it if it "
                       "is meant as text).")
        else:
            try:
                value = self._constructor.construct_object(node, deep=True)
            except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise ValueError,
                # KeyError and AttributeError as well as YAMLError for values they cannot read
                reason = (getattr(exc, "problem", None) or str(exc)
                          if isinstance(exc, yaml.YAMLError | ValueError) else "it is not one")
                message = (f"{show(node.value)} on line {line} cannot be read as "
                           f"{_tag(node.tag)} ({reason}); quote it if it is meant as text.")
            if isinstance(value, str) and _SURROGATE.search(value):
                message = (f"{show(value)} on line {line} holds a lone surrogate (an escape "
                           "between \\ud800 and \\udfff), which cannot be stored; remove it.")
        if message is None:
            return value
        self.problem(path, message, line=line)
        if not key:  # a bad key drops its entry, and its mapping is checked as usual
            self.broken.add(path)
        return None

    def line(self, path: tuple[Any, ...]) -> int | None:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)

    def problem(self, path: tuple[Any, ...], message: str, *, line: int | None = None) -> None:
        if path in self.broken:
            return
        if len(self.problems) >= MAX_PROBLEMS:
            self.unlisted += 1
            return
        self.problems.append(
            Problem(file=self.file, line=line if line is not None else self.line(path),
                    message=message)
        )

    @property
    def full(self) -> bool:
        """True once ``MAX_PROBLEMS`` are listed: checks that cost time per problem stop."""
        return len(self.problems) >= MAX_PROBLEMS

    def listed(self) -> list[Problem]:
        """The problems, with a last one that counts those beyond ``MAX_PROBLEMS``."""
        if not self.unlisted:
            return list(self.problems)
        return [*self.problems, Problem(file=self.file, line=None, message=(
            f"{self.unlisted} more problems are not listed (only the first {MAX_PROBLEMS} "
            "are); fix these, then load the file again to see the rest."))]

    # -- checks of single values: each adds a problem and returns a default

    def mapping(self, value: Any, path: tuple[Any, ...], allowed: tuple[str, ...]
                ) -> dict[str, Any]:
        """``value`` if it is a mapping (unknown keys are problems), else ``{}``."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"{where(path)} must be a mapping (key: value lines), "
                               f"not {type(value).__name__}.")
            return {}
        for key in value:
            if key in allowed:
                continue
            if self.full:  # no "did you mean" for problems that will not be listed
                self.unlisted += 1
            else:
                self.problem((*path, key), f"Unknown key {show(key)} in {where(path)}."
                                           f"{did_you_mean(key, allowed)} "
                                           f"Allowed keys: {', '.join(allowed)}.")
        return value

    def whole_number(self, value: Any, path: tuple[Any, ...], *, minimum: int,
                     default: int | None, maximum: int | None = None) -> int | None:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.problem(path, f"{where(path)} must be a whole number of at least {minimum}, "
                               f"not {show(value)}.")
            return default
        if maximum is not None and value > maximum:
            self.problem(path, f"{where(path)} must be at most {maximum}, not {show(value)}.")
            return default
        return value

    def text(self, value: Any, path: tuple[Any, ...], *, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.problem(path, f"{where(path)} is required.")
            return None
        if not isinstance(value, str) or (required and not value.strip()):
            self.problem(path, f"{where(path)} must be non-empty text, not {show(value)}.")
            return None
        return value


def _yaml_problem(file: str, text: str, exc: yaml.YAMLError) -> Problem:
    """One problem for text that PyYAML cannot parse, with its line."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = len(_LINE_BREAK.findall(text, 0, exc.position)) + 1
        return Problem(file=file, line=line, message=(
            f"This is not valid YAML: the character U+{exc.character:04X} on line {line} may "
            "not appear in a YAML file; remove it."))
    mark = getattr(exc, "problem_mark", None)
    reason = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    opened = getattr(exc, "context_mark", None)
    at = None if mark is None else _line(text, mark)
    unclosed = _UNCLOSED.get(context or "")
    if unclosed is not None and opened is not None:
        # PyYAML notices an unclosed bracket or quote where the text no longer fits, often
        # lines later (or at the end of the file): name the line where it opens.
        what, close = unclosed
        start = opened.line + 1
        noticed = f"on line {at}: " if at is not None else ""
        return Problem(file=file, line=start, message=(
            f"This is not valid YAML: the {what} opened on line {start} is not closed "
            f"({noticed}{reason}); close it with {close}."))
    detail = f"{reason} ({context})" if context else str(reason)
    return Problem(file=file, line=at, message=f"This is not valid YAML: {detail}.")


#: PyYAML's context for a construct that opens with a bracket or quote and must be closed:
#: what it is, and what closes it.
_UNCLOSED = {
    "while parsing a flow sequence": ("flow sequence '['", "']'"),
    "while parsing a flow mapping": ("flow mapping '{'", "'}'"),
    "while scanning a quoted scalar": ("quoted scalar", "its quote"),
}


def _line(text: str, mark: yaml.Mark) -> int:
    """The 1-based line of ``mark``. A mark at the very end of a file that ends with a line
    break is on the line after the last one: that is the last line."""
    line = mark.line + 1
    if mark.index >= len(text) and line > 1 and _LINE_BREAK.search(text[-2:]):
        line -= 1
    return line


def did_you_mean(word: str, choices: Any) -> str:
    if len(word) > 200:  # no name is that long, and difflib's time grows with it
        return ""
    close = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def where(path: tuple[Any, ...]) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out or "the top level"
