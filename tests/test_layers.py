"""The package's layering, read from the source: what each module imports.

    shared (no I/O)  <-  sync driver, asyncio driver (neither imports the other)  <-  Celery layer

Nothing imports a layer above its own. ``celery_dlock/__init__.py`` (the sync public API)
and ``celery_dlock/asyncio/__init__.py`` (the asyncio one) only re-export.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "celery_dlock"

SHARED = {
    "errors",
    "keys",
    "options",
    "scripts",
    "lease",
    "protocol",
    "schedule",
    "inbox",
    "naming",
    "connection",
}
SYNC = {"lock", "channel", "deadline", "notify", "watchdog", "convenience", "fencing"}
STANDALONE = {"embedded"}  # the demo's and the tests' redis-server: imports nothing of ours
LAYERS = {
    "shared": SHARED,
    "sync": SYNC,
    "asyncio": {"asyncio." + m for m in ("lock", "notify", "watchdog", "convenience")},
    "celery": {"beat"}
    | {"celery." + p.stem for p in (PACKAGE / "celery").glob("*.py") if p.stem != "__init__"},
    "standalone": STANDALONE,
}
MAY_IMPORT = {
    "shared": {"shared"},
    "sync": {"shared", "sync"},
    "asyncio": {"shared", "asyncio"},
    "celery": {"shared", "sync", "celery"},
    "standalone": set(),
}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
#: A package imported as such (``from celery_dlock.celery import dedup``): its own layer's;
#: the top package re-exports the sync lock.
PACKAGES = {"": "sync", "asyncio": "asyncio", "celery": "celery"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imported_modules(path: Path) -> set[str]:
    """Our modules ``path`` imports (at any depth: a function's import counts too)."""
    here = module_name(path).split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = here[: len(here) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module == "celery_dlock":
                target = ""
            elif node.module and node.module.startswith("celery_dlock."):
                target = node.module.removeprefix("celery_dlock.")
            else:
                continue
            # ``from celery_dlock import protocol``: that module, not the package.
            submodules = {f"{target}.{a.name}".lstrip(".") for a in node.names}
            if submodules <= set(LAYER_OF):
                found.update(submodules)
                continue
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("celery_dlock.") for a in node.names if a.name.startswith("celery_dlock.")
            )
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_has_a_layer() -> None:
    assert {module_name(p) for p in MODULES} == set(LAYER_OF)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_a_module_imports_only_its_own_layer_and_those_below(path: Path) -> None:
    layer = LAYER_OF[module_name(path)]
    layers = {target: LAYER_OF.get(target) or PACKAGES.get(target) for target in imported_modules(path)}
    wrong = {target: found for target, found in layers.items() if found not in MAY_IMPORT[layer]}
    assert not wrong, f"{module_name(path)} ({layer}) imports {wrong}"


def test_the_check_sees_a_driver_importing_the_other() -> None:
    """The checker itself: a relative and an absolute import across drivers are both found."""
    source = PACKAGE / "asyncio" / "lock.py"
    assert "lease" in imported_modules(source)
    assert "asyncio.notify" in imported_modules(source)  # from .notify import ...
