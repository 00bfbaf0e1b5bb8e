"""``federation/`` (the contract both sides import) type-checks under ``mypy --strict``
(CONVENTIONS 15): a wrong type at the shared seam fails the suite, not a site."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_federation_is_mypy_strict_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports",
         "--cache-dir", "/dev/null", "federation"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
