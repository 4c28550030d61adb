"""The import rules of docs/architecture.md: the core never imports a stage, stages never import each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = "xlbake"
STAGES = ("finetune", "extract", "resize")


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_core_never_imports_a_stage_and_stages_never_import_each_other():
    """The umbrella CLI names stage commands as strings (xlbake.cli.STAGES), so it needs no import either."""
    broken = []
    for package in (CORE, *STAGES):
        forbidden = set(STAGES) - {package}
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in sorted(imported_packages(path) & forbidden):
                broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert broken == []
