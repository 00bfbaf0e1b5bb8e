"""``make bench``: run every bench module present and print one table of figures.

Each area (edge, federation, hub) owns a module with ``run() -> list[Row]``; areas not written
yet are skipped, so the command works at every stage of the project.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from bench.common import Row, format_table, progress

MODULES = ("bench.edge", "bench.federation", "bench.ingest", "bench.ingest_apply", "bench.hub",
           "bench.artifacts", "bench.sitefetch", "bench.oci", "bench.flood")


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module exists but something it imports does not
            raise
        return None


def main() -> int:
    rows: list[Row] = []
    for name in MODULES:
        module = _load(name)
        if module is None:
            progress(f"{name}: not written yet, skipped")
            continue
        rows.extend(module.run())
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
