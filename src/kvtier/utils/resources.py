"""Find data files inside installed packages without importing them, and kvtier's cache.

Some data ships as pip packages whose `__init__` has side effects or heavy imports (the ShareGPT
dump, tokenizer files). `importlib.util.find_spec` on a top-level name locates a package without
executing it, so this is the one safe way to reach those files.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path


def kvtier_cache_dir() -> Path:
    """kvtier's cache (converted GGUFs and their tokenizers): $KVTIER_CACHE_DIR, else
    ~/.cache/kvtier."""
    configured = os.environ.get("KVTIER_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kvtier"


def find_package_file(package: str, relative_path: str) -> Path:
    """Return the path of `relative_path` inside the installed top-level `package`.

    Raises FileNotFoundError naming the package and the file when either is missing.
    """
    if "." in package:
        raise ValueError(f"{package!r}: give a top-level package (find_spec would import parents)")
    for root in _package_roots(package):
        candidate = root / relative_path
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{relative_path} not found in installed package {package!r}")


def _package_roots(package: str) -> list[Path]:
    """Directories that may hold the package: the import spec's, then its distribution's."""
    roots: list[Path] = []
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        roots.extend(Path(p) for p in spec.submodule_search_locations)
    for dist_name in (package, package.replace("_", "-")):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        roots.append(Path(str(dist.locate_file(package))))
    return roots
