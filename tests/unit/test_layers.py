"""The subpackages are the layers (doc/ARCHITECTURE.md): a module imports only from its own
subpackage or from a layer below it, never upward or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import dcorfs

ROOT = Path(dcorfs.__file__).parent
# bottom to top; subpackages of one rank never import each other
RANK = {
    "": 0,  # dcorfs/__init__.py, errors.py, settings.py: what every layer shares
    "cache": 1,
    "devserver": 1,  # stands apart: only the shared base
    "remote": 2,
    "hdf5": 2,
    "opening": 3,
    "fs": 4,
    "daemon": 5,
    "admin": 6,
    "cli": 7,
    "__main__": 8,
}


def layer(module: str) -> str:
    """The layer of a dotted module name under `dcorfs` ("" for the shared base)."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if (ROOT / parts[0]).is_dir():
        return parts[0]
    return parts[0] if parts[0] in ("cli", "__main__") else ""


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every dcorfs module a file imports, lazy ones too."""
    module = "dcorfs." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from .. import cache`: the names may be subpackages
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "dcorfs"]


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 50
    for path in files:
        own = layer("dcorfs." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, name in imports(path):
            other = layer(name)
            if other != own and RANK[other] >= RANK[own]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {own or 'base'} → {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_every_subpackage_is_a_known_layer_with_its_entry_note() -> None:
    for package in sorted(p for p in ROOT.iterdir() if (p / "__init__.py").exists()):
        assert package.name in RANK, f"{package.name} has no place among the layers"
        note = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert note and len(note) > 200, f"{package.name}/__init__.py says what the layer is"
