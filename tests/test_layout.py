"""The import rules that `library/__init__.py` and `networks/__init__.py` state hold for every module, so the
folders keep showing the flow (config -> data / model -> train -> report -> files) as code is added. Function-level
and TYPE_CHECKING imports count: a rule broken lazily is still broken."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"library.errors", "library.sdscripts_options"}
# What each wing may import besides itself and the leaves (a wing is `library.<folder>` or `networks`).
ALLOWED = {
    "library.config": {"library.data", "library.model", "library.train", "library.report", "library.files", "networks"},
    "library.train": {"library.data", "library.model", "library.report", "library.files", "networks"},
    "library.data": {"library.files"},
    "library.model": {"library.files", "networks.sdxl_keys"},
    "library.report": {"library.files"},
    "library.files": {"networks.sdxl_keys"},
    "networks": {"library.files"},
}
WINGS = sorted(ALLOWED)


def wing_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "library" and len(parts) > 1 else parts[0]


def our_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of `library` or `networks` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in ("library", "networks")]
    return found


def allowed(source_wing: str, target: str) -> bool:
    if wing_of(target) == source_wing or target in LEAVES or wing_of(target) in LEAVES:
        return True
    return any(target == rule or target.startswith(rule + ".") for rule in ALLOWED[source_wing])


def modules_of(wing: str) -> list[Path]:
    folder = ROOT / Path(*wing.split("."))
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("wing", WINGS)
def test_wing_imports_only_what_its_rule_allows(wing):
    broken = [
        f"{path.relative_to(ROOT)}:{line}: imports {target}"
        for path in modules_of(wing)
        for line, target in our_imports(path)
        if not allowed(wing, target)
    ]
    assert not broken, f"{wing} may import only {sorted(ALLOWED[wing])} and the leaves:\n" + "\n".join(broken)


def test_key_tables_and_leaves_import_nothing_of_ours():
    """`networks.sdxl_keys` is what `library.files` stands on, and the leaves are what every wing may import: any
    import of ours there would close a cycle."""
    for path in [ROOT / "networks" / "sdxl_keys.py", ROOT / "library" / "errors.py"]:
        assert our_imports(path) == [], path


def test_every_wing_says_what_lives_there_and_what_it_may_import():
    for folder in [*(ROOT / "library").iterdir(), ROOT / "networks"]:
        if folder.is_dir() and (folder / "__init__.py").exists():
            doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))) or ""
            assert "may import" in doc.lower(), (
                f"{folder.relative_to(ROOT)}/__init__.py: no import rule in its docstring"
            )
            wing = "networks" if folder.name == "networks" else f"library.{folder.name}"
            assert wing in ALLOWED, f"{wing} has no rule in tests/test_layout.py"


def test_the_rule_check_catches_an_upward_import(tmp_path):
    """The checker itself: a files-wing module importing the trainer is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from library.train.trainer import train\n")
    assert [target for _, target in our_imports(bad) if not allowed("library.files", target)] == [
        "library.train.trainer"
    ]
