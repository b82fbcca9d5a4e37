"""Imports go downward only (design section 12): each module imports only earlier layers."""

from __future__ import annotations

import ast
from pathlib import Path

import xml_pipeline

PACKAGE = Path(xml_pipeline.__file__).parent

# Lower layers first. A module may import modules of its own or an earlier layer.
LAYERS = [
    {"errors", "types", "histogram", "version"},
    {"ids", "xmlsafe"},
    {"schemas", "envelope"},
    {"config"},
    {"events"},
    {"log"},
    {"state"},
    {"runtime"},
    {"api", "cli", "__main__", "__init__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"xml_pipeline.{module} is in no layer; add it to LAYERS.")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("xml_pipeline."):
                found.append(node.module.removeprefix("xml_pipeline."))
            elif node.module == "xml_pipeline":  # the names come from the package's __init__
                found.append("__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "xml_pipeline":
                    found.append("__init__")
                elif alias.name.startswith("xml_pipeline."):
                    found.append(alias.name.removeprefix("xml_pipeline."))
    return found


def test_imports_go_downward_only() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module.endswith("__init__") and module != "__init__":
            module = module.removesuffix(".__init__")
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_modules_stay_small() -> None:
    big = [f"{p.relative_to(PACKAGE)}: {n} lines" for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 400]
    assert big == []


def test_public_api_is_sorted_and_importable() -> None:
    assert xml_pipeline.__all__ == sorted(xml_pipeline.__all__)
    for name in xml_pipeline.__all__:
        assert getattr(xml_pipeline, name) is not None
