"""The import rule of services/: the model library (services/models) sits under train, generate, evaluate and mask
and imports only runtime; generate, evaluate and mask never reach into train; no service hides an import of a
sibling service inside a function. Checked on the source with `ast`, so a violation names its file and line."""
from __future__ import annotations

import ast
from pathlib import Path

import persona.services

SERVICES_DIR = Path(persona.services.__file__).resolve().parent
# Layers every service may import, at the top of a module.
SHARED = {"runtime", "models"}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    return _imports_in(path.read_text(), path.relative_to(SERVICES_DIR).parts[:-1])


def _imports_in(source: str, package: tuple[str, ...]) -> list[tuple[str, int, bool]]:
    """(service imported, "" for a module outside persona.services; line; inside a function?) per import in
    `source`, a module of `package` (its folders under services/, e.g. ("train", "methods"))."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((_service(alias.name.split(".")), child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolved against this module's package
                    base = list(package[:len(package) - child.level + 1])
                    names = base + (child.module.split(".") if child.module else [])
                    targets = [names] if child.module else [names + [a.name] for a in child.names]
                    found.extend((t[0] if t else "", child.lineno, in_function) for t in targets)
                else:
                    found.append((_service((child.module or "").split(".")), child.lineno, in_function))
            visit(child, nested)

    visit(ast.parse(source), False)
    return found


def _service(dotted: list[str]) -> str:
    """"train" for persona.services.train..., "" for any other module."""
    return dotted[2] if dotted[:2] == ["persona", "services"] and len(dotted) > 2 else ""


def _modules(service: str) -> list[Path]:
    return sorted((SERVICES_DIR / service).rglob("*.py"))


def test_the_rule_reads_absolute_relative_and_function_local_imports():
    source = """
import json
from persona.services.runtime.errors import NotFound
from ..models.library import ModelLibrary
from . import sampling
from .. import subjects


def load():
    from persona.services.train import domain
    import persona.services.mask.p3s
    return domain
"""
    assert _imports_in(source, ("generate",)) == [
        ("", 2, False), ("runtime", 3, False), ("models", 4, False), ("generate", 5, False), ("subjects", 6, False),
        ("train", 10, True), ("mask", 11, True)]
    # Two levels up from a subpackage: train/methods/x.py's `from ..loop import` is train's own.
    assert _imports_in("from ..loop import TrainConfig", ("train", "methods")) == [("train", 1, False)]


def test_generate_evaluate_and_mask_never_import_train():
    offenders = [f"{path.relative_to(SERVICES_DIR)}:{line}" for service in ("generate", "evaluate", "mask")
                 for path in _modules(service) for imported, line, _ in _imports(path) if imported == "train"]
    assert offenders == [], "read concepts and exports from services/models instead"


def test_the_model_library_imports_only_runtime():
    offenders = [f"{path.relative_to(SERVICES_DIR)}:{line} imports {imported}" for path in _modules("models")
                 for imported, line, _ in _imports(path) if imported and imported not in SHARED]
    assert offenders == []


def test_no_service_imports_a_sibling_service_inside_a_function():
    services = [p.name for p in SERVICES_DIR.iterdir() if (p / "__init__.py").is_file() and p.name not in SHARED]
    offenders = [f"{path.relative_to(SERVICES_DIR)}:{line} imports {imported}" for service in services
                 for path in _modules(service) for imported, line, local in _imports(path)
                 if local and imported and imported != service and imported not in SHARED]
    assert offenders == [], "import it at the top of the module, or move what both need into services/models"
