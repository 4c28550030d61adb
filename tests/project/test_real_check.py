"""The real-size check's chain (benchmarks/real_check.py, `make test-real`) at tiny size, so it cannot rot."""

from __future__ import annotations

import pytest

from benchmarks import real_check


@pytest.mark.slow
def test_tiny_chain_passes_its_checks(tmp_path, capsys):
    assert real_check.main(["--size", "tiny", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "base: wrote" in out and "real check: passed" in out
    assert real_check.main(["--size", "tiny", "--cache", str(tmp_path), "--stage", "build"]) == 0
    assert "base: reusing" in capsys.readouterr().out
