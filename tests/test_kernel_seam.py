"""The service's seam to the kernel holds: daemon/kernel.py and daemon/service/ import neither
the libnftables binding nor the kernel side behind the seam (daemon/counters.py, daemon/nft/),
directly or through any daemon module they import. Read from the import statements: nothing is
imported to check."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEHIND_THE_SEAM = ("nftables", "daemon.nft", "daemon.counters")


def imported(path: Path) -> set[str]:
    """The modules a file's import statements name (for `from m import n`, m and m.n)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def source_of(module: str) -> Path | None:
    """The file of a daemon module (or package), None for anything else."""
    if module.split(".")[0] != "daemon":
        return None
    base = ROOT.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def reached(start: Iterable[Path]) -> dict[str, str]:
    """Every module the files import, directly or through the daemon modules (and their
    packages) they import: module -> the first file seen importing it."""
    importer: dict[str, str] = {}
    todo, seen = list(start), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported(path):
            importer.setdefault(name, str(path.relative_to(ROOT)))
            parts = name.split(".")
            todo += [p for i in range(len(parts)) if (p := source_of(".".join(parts[: i + 1])))]
    return importer


def behind_the_seam(importer: dict[str, str]) -> dict[str, str]:
    return {
        name: by
        for name, by in importer.items()
        if any(name == m or name.startswith(f"{m}.") for m in BEHIND_THE_SEAM)
    }


def test_kernel_py_and_the_service_never_import_nftables_or_the_kernel_side() -> None:
    start = [ROOT / "daemon" / "kernel.py", *sorted((ROOT / "daemon" / "service").glob("*.py"))]
    assert len(start) > 5
    assert behind_the_seam(reached(start)) == {}


def test_the_check_sees_the_kernel_side_importing_nftables() -> None:
    found = behind_the_seam(reached([ROOT / "daemon" / "counters.py"]))
    assert found["nftables"] == "daemon/nft/libnft.py"
    assert found["daemon.nft.layout"] == "daemon/counters.py"
