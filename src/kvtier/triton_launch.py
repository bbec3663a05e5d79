"""Launch Triton kernels through their compiled handles: the host cost of eager steps.

`kernel[grid](...)` runs `JITFunction.run` on every call: it binds and specialises every
argument, rebuilds the cache key (a `str` of the options among it), checks the kernel's
globals and builds launch metadata; the C launcher then calls the launch hook chains (empty,
but Python calls). A prefill step outside the full decode graphs launches the attention
kernels eagerly, in every layer, and such steps (Q's tier hits) are bound by host time.

`CachedKernel` keeps, per call shape, the compiled kernel that the first call through
`JITFunction.run` returned, and later calls go straight to its launcher. The key holds what
Triton specialises on (each runtime argument's specialisation from Triton's own
`native_specialize_impl`: dtype, 16-byte alignment, int width, value 1, divisibility by 16),
the keyword arguments (constexprs and launch options, e.g. `num_warps`, `launch_pdl`) and the
device. Triton's own key can only be coarser (`do_not_specialize` parameters), so the kernel a
key maps to is the one `JITFunction.run` would launch. Like vLLM's and triton-dejavu's caches it
skips the check that the kernel's global values have not changed since compilation: kvtier's
kernels read only constants. Under Triton's interpreter, with launch hooks set (profilers),
with a constexpr passed by position or a runtime argument by keyword, or with
`KVTIER_CACHED_LAUNCH=0` (A/B runs), every call takes `JITFunction.run`.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SWITCHED_OFF = os.environ.get("KVTIER_CACHED_LAUNCH", "1") == "0"


class CachedKernel:
    """A `@triton.jit` kernel launched as `cached[grid](*runtime_args, **constexprs_and_options)`,
    the same call as the kernel's own. Runtime arguments by position, constexprs by keyword."""

    def __init__(self, kernel: JITFunction) -> None:
        self.kernel = kernel
        self.enabled = isinstance(kernel, JITFunction) and not (_INTERPRETED or _SWITCHED_OFF)
        params = kernel.params if isinstance(kernel, JITFunction) else []
        self._param_names = [p.name for p in params]
        self._defaults = [p.default for p in params]
        self._runtime_names = {p.name for p in params if not p.is_constexpr}
        self._leading_runtime = next((i for i, p in enumerate(params) if p.is_constexpr),
                                     len(params))
        """Positional arguments past this index would be constexprs: their values, not their
        specialisation, select the kernel, so such calls are not cached."""
        self._launches: dict[tuple, tuple[Any, tuple]] = {}
        """key -> (compiled kernel, the bound values of the parameters after the positional
        ones: constexprs and defaults, in parameter order)."""

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.enabled or len(args) > self._leading_runtime or _launch_hooks_set():
            self.kernel[grid](*args, **kwargs)
            return
        device = driver.active.get_current_device()
        key = self._key(device, args, kwargs)
        entry = self._launches.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if hasattr(compiled, "result"):  # Triton's asynchronous compilation mode
                compiled = compiled.result()
            if self._runtime_names.isdisjoint(kwargs):  # a runtime value in the key: no cache
                self._launches[key] = (compiled, self._bound_tail(len(args), kwargs))
            return
        compiled, tail = entry
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], grid_1, grid_2, driver.active.get_current_stream(device),
                     compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)

    def _key(self, device: int, args: tuple, kwargs: dict[str, Any]) -> tuple:
        backend = self.kernel.device_caches[device][3]
        return (device, tuple(kwargs.items()),
                tuple([native_specialize_impl(backend, a, False, True, True) for a in args]))

    def _bound_tail(self, num_positional: int, kwargs: dict[str, Any]) -> tuple:
        tail = []
        for name, default in zip(self._param_names[num_positional:],
                                 self._defaults[num_positional:], strict=True):
            if name in kwargs:
                tail.append(kwargs[name])
            elif default is not inspect.Parameter.empty:
                tail.append(default)
            else:
                raise TypeError(f"{self.kernel.fn.__name__}: missing argument {name!r}")
        return tuple(tail)


def _launch_hooks_set() -> bool:
    """Whether a launch hook is registered (a profiler): Triton 3.6's hooks are chains that
    are never None, empty unless something added a hook; older ones are None or a function."""
    runtime = knobs.runtime
    return any(getattr(hook, "calls", hook)
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))
