"""The bench package talks HTTP only: it must import neither torch nor the engine's layers."""

from __future__ import annotations

import subprocess
import sys

ALLOWED = ("kvtier", "kvtier.bench", "kvtier.utils", "kvtier.types")


def test_bench_imports_no_torch_and_no_engine_layer():
    code = ("import sys, kvtier.bench, kvtier.bench.client, kvtier.bench.sharegpt; "
            "print('\\n'.join(sorted(sys.modules)))")
    modules = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True).stdout.split()
    assert not [m for m in modules if m.split(".")[0] in ("torch", "transformers")]
    kvtier = [m for m in modules if m.split(".")[0] == "kvtier"]
    assert all(m in ALLOWED or m.startswith(("kvtier.bench.", "kvtier.utils.")) for m in kvtier)
