"""The package's folders are its layers, and imports only point down: a module may import from its
own folder and from the folders before it in LAYERS, never from one after it."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import repro

PACKAGE = Path(repro.__file__).resolve().parent
LAYERS = ["core", "data", "editors", "measure", "runs", "study", "reporting"]


def imported_layers(path: Path) -> set[str]:
    """The layers a module imports from (absolute ``repro.*`` and relative imports alike)."""
    own = path.relative_to(PACKAGE).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(own[:-1])[: len(own) - node.level]
                module = ".".join(["repro", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "repro" and len(parts) > 1 and parts[1] in LAYERS:
                found.add(parts[1])
                break
    return found


def test_every_module_sits_in_a_layer():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert flat == [], f"modules outside the layer folders: {flat}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(LAYERS)


def test_imports_only_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0]
        for other in imported_layers(path):
            if LAYERS.index(other) > LAYERS.index(layer):
                upward.append(f"{path.relative_to(PACKAGE)} imports repro.{other}")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a measurement importing a runner is reported."""
    bad = PACKAGE / "measure" / "norms.py"
    source = bad.read_text() + "\nfrom ..runs.lifecycle import Run  # noqa\n"
    fake = tmp_path / "repro"
    (fake / "measure").mkdir(parents=True)
    (fake / "measure" / "norms.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert imported_layers(fake / "measure" / "norms.py") >= {"runs", "core"}
