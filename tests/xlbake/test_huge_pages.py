"""Extract and resize ask torch for transparent huge pages before torch is imported (xlbake.devices)."""

import os
import subprocess
import sys

import pytest

# records THP_MEM_ALLOC_ENABLE at the moment torch is first imported, then imports the entry point
PROBE = """
import builtins, os, sys
seen, real = [], builtins.__import__
def spy(name, *args, **kwargs):
    if name == "torch" and not seen:
        seen.append(os.environ.get("THP_MEM_ALLOC_ENABLE"))
    return real(name, *args, **kwargs)
builtins.__import__ = spy
{entry}
print(seen)
"""
RUN_MODULE = "import runpy\nsys.argv = ['{0}', '--help']\ntry: runpy.run_module('{0}', run_name='__main__')\n"
ENTRIES = {
    "python -m extract": RUN_MODULE.format("extract") + "except SystemExit: pass",
    "python -m resize": RUN_MODULE.format("resize") + "except SystemExit: pass",
    "xlbake extract": "from xlbake.cli import main\ntry: main(['extract', '--help'])\nexcept SystemExit: pass",
}


def probe(entry: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(entry=entry)], capture_output=True, text=True, env=clean, check=True
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("command", sorted(ENTRIES))
def test_huge_pages_are_asked_for_before_torch_is_imported_and_a_user_setting_wins(command):
    assert probe(ENTRIES[command]) == "['1']"
    assert probe(ENTRIES[command], THP_MEM_ALLOC_ENABLE="0") == "['0']"
