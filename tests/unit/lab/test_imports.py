"""The lab talks HTTP and starts servers as subprocesses: no torch, no engine layers."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import kvtier.lab

ALLOWED = ("kvtier", "kvtier.types", "kvtier.bench", "kvtier.utils", "kvtier.lab")


def test_lab_imports_no_torch_and_no_engine_layer():
    modules = [f"kvtier.lab.{m.name}" for m in pkgutil.iter_modules(kvtier.lab.__path__)]
    code = (f"import sys; import {', '.join(modules)}; "
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True).stdout.split()
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "transformers")]
    ours = [m for m in loaded if m.split(".")[0] == "kvtier"]
    assert all(m in ALLOWED or m.startswith(tuple(f"{a}." for a in ALLOWED[2:])) for m in ours), \
        sorted(set(ours) - set(ALLOWED))
