"""Whole optimisation steps compiled by :func:`torch.compile`: the conventions shared by the
meta-learning engine (:func:`adaptrep.meta.compile_step`) and the generic source training
(:func:`adaptrep.models.fit_shared`).

A step is a pure function of tensors (parameters, optimiser state, data) that returns the new ones;
it is compiled with static shapes into one graph (``fullgraph=True``), its driver written in C++ by
inductor (``cpp_wrapper``: a step calls tens of small kernels, and a Python driver costs about as
much as they do), run with :data:`COMPILED_THREADS` CPU threads, and its artefacts kept in an on-disk
cache (:func:`enable_compile_cache`) so that a later process compiles faster. Whether to compile is
``"auto"``, ``"always"`` or ``"never"`` (:data:`COMPILE_MODES`); ``"auto"`` compiles runs long enough
to repay the compilation, by a rule of each caller.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["COMPILE_MODES", "COMPILED_THREADS", "check_compile_mode", "compile_function", "enable_compile_cache"]

#: What ``compile=`` accepts: compile when the caller's rule says the run is long enough, always, never.
COMPILE_MODES = ("auto", "always", "never")

#: Intra-op threads of a compiled step (:func:`compile_function`). Its kernels are small (a batch of small
#: tasks: tens of microseconds each) and there are tens of them a step; with more threads every kernel ends at a
#: barrier that waits for the slowest thread, and on a busy machine that thread may be descheduled for a time
#: slice. Measured on a loaded 2-core machine (linear MAML, 5 steps): about 30 it/s with 2 threads, 450 with 1.
COMPILED_THREADS = 1


def check_compile_mode(compile: str) -> str:
    """``compile`` if it is one of :data:`COMPILE_MODES`; a one-line ``ValueError`` otherwise."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {compile!r}")
    return compile


def enable_compile_cache() -> str:
    """Turn on inductor's on-disk caches (FX graph cache, AOT autograd cache) so that a later process
    reuses compiled artefacts; ``TORCHINDUCTOR_CACHE_DIR`` defaults to ``~/.cache/adaptrep/inductor``
    (``$XDG_CACHE_HOME`` respected) unless set. Returns the cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(base, "adaptrep", "inductor"))
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return directory


def compile_function(fn: Callable[..., Any], threads: int | None = COMPILED_THREADS, options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``fn`` compiled by :func:`torch.compile` with static shapes, one graph and a C++ driver
    (inductor ``options`` added to ``cpp_wrapper``), the on-disk cache on.

    ``threads``: the CPU threads the compiled function runs with (its generated kernels and the library
    calls in it; torch's thread count is set for the call and restored after it); ``None`` keeps torch's
    setting (:data:`COMPILED_THREADS` says why the default is 1)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1; got {threads!r}")
    from torch._dynamo.exc import FailOnRecompileLimitHit

    enable_compile_cache()
    options = {"cpp_wrapper": True, **(options or {})}
    if threads is not None:
        options.setdefault("cpp.threads", threads)
    compiled = torch.compile(fn, dynamic=False, fullgraph=True, options=options)
    code = getattr(fn, "__code__", None)

    def call(*args: Any) -> Any:
        try:
            return compiled(*args)
        except FailOnRecompileLimitHit:
            if code is None:
                raise
            # Dynamo keeps at most ``recompile_limit`` graphs per code object (shapes, models, dtypes: one each),
            # and with one graph a further one is an error: forget this code's graphs (their artefacts stay in
            # the on-disk cache, so one that comes back is rebuilt from there) and compile again
            torch._dynamo.reset_code(code)
            return compiled(*args)

    if threads is None:
        return call

    def run(*args: Any) -> Any:
        before = torch.get_num_threads()
        if before == threads:
            return call(*args)
        torch.set_num_threads(threads)
        try:
            return call(*args)
        finally:
            torch.set_num_threads(before)

    return run
