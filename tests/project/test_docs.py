"""The README's config reference is generated from the config dataclasses and must match the code."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_config_reference_is_current():
    gen = _generator()
    section = gen.current_section((ROOT / "README.md").read_text(encoding="utf-8"))
    assert section is not None, "README.md lacks the config reference markers"
    assert section == gen.render(), "README config reference is stale: run `python docs/config_reference.py --write`"


def test_every_config_option_is_documented():
    from xlbake.config import describe

    undocumented = [f.key for _, _, cls in _generator()._sections() for f in describe(cls) if not f.doc.strip()]
    assert undocumented == []


def _modules_by_package() -> dict[str, list[str]]:
    """Package folder (``xlbake/sdxl/``) -> its modules, for every package of the code (not tests/benchmarks)."""
    packages: dict[str, list[str]] = {}
    for top in ("xlbake", "finetune", "extract", "resize"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name not in ("__init__.py", "__main__.py"):
                packages.setdefault(f"{path.parent.relative_to(ROOT).as_posix()}/", []).append(path.name)
    return packages


def test_architecture_lists_every_module():
    """docs/architecture.md has one table per package and a row per module: a new module needs its line there."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    sections = {part.split("`")[0]: part for part in doc.split("\n### `")[1:]}
    missing = [
        f"{package}{name}"
        for package, names in _modules_by_package().items()
        for name in names
        if f"| `{name}` |" not in sections.get(package, "")
    ]
    assert missing == [], f"docs/architecture.md lacks a row for: {', '.join(missing)}"
