"""What the Triton kernel tests share: where to run them (a GPU, or the CPU under Triton's
interpreter), and compiling a kernel for sm_90 without a GPU to read its resources and SASS.
Imported by name (tests/gpu is on sys.path), so it also works with --noconftest."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_device() -> torch.device:
    """CUDA; else the CPU under TRITON_INTERPRET=1; else the test is skipped."""
    if torch.cuda.is_available() and not INTERPRET:
        return torch.device("cuda")
    if INTERPRET:
        from kvtier.attention.triton_kernels import fix_interpreter_scalar_index
        fix_interpreter_scalar_index()
        return torch.device("cpu")
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 to run the kernels on CPU")


@dataclass(frozen=True)
class Sm90Build:
    resources: dict[str, int]
    """From `cuobjdump -res-usage` (REG, STACK, SHARED, LOCAL) and shared_dynamic."""
    sass: str
    ptx: str


def compile_sm90(fn: triton.JITFunction, pointers: dict[str, str], constexprs: dict,
                  num_warps: int, num_stages: int, multiples_of_16: tuple[str, ...] = (),
                  ) -> Sm90Build:
    """Compile a kernel for sm_90 without a GPU (Triton's bundled ptxas): its resource usage,
    SASS and PTX. multiples_of_16: integer arguments that Triton's launcher would specialise
    as multiples of 16 for the shapes of interest."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    # Constexprs left out take their defaults, as a launch would.
    constexprs = {**{p.name: p.default for p in fn.params
                     if p.is_constexpr and p.has_default}, **constexprs}
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    # Pointers and strides arrive 16-aligned in practice (Triton specialises on that).
    aligned = [(names.index(n),) for n in names
               if n.endswith("_ptr") or (n.startswith("stride_") and n != "stride_table")
               or n in multiples_of_16]
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v
                                                  for k, v in constexprs.items()},
                       attrs={i: [["tt.divisibility", 16]] for i in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    resources = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    resources["shared_dynamic"] = kernel.metadata.shared
    return Sm90Build(resources, sass, kernel.asm["ptx"])
