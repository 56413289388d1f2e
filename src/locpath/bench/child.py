"""One measured step in a fresh interpreter, so its memory figure is its own.

Linux carries `ru_maxrss` across fork and exec (at exec the old image's high-water mark is folded into it, and a
vfork'd child's old image is its parent's), so a step run in the bench's own process, or in a child that reads
`ru_maxrss`, reports whatever the bench held before it (shards written, an earlier step's weights). Here a step runs
as `python -m locpath.bench.child module:function` with its keyword arguments as JSON on stdin; at its end the child
reads VmHWM (the peak resident set of its own address space, which exec starts afresh) from /proc/self/status and
returns it beside the step's result:

    res = run_step("locpath.bench.published:measure_runtime", {"bundle": "...", ...})
    res["process"]["peak_rss_mb"]       # the step's own peak (VmHWM), MB
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import resource
import subprocess
import sys

from ..errors import LocpathError

ALLOWED = "locpath.bench."  # steps are bench functions, named by this package, never by a user


def own_process() -> dict:
    """This process's own memory figures (MB): VmHWM and VmRSS now; ru_maxrss beside them, to show what an
    inherited peak would have said."""
    from .memory import status_kb

    return {"peak_rss_mb": round(status_kb("VmHWM") / 1024, 1), "rss_end_mb": round(status_kb("VmRSS") / 1024, 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "source": "VmHWM of a fresh child process (/proc/self/status)"}


def probe(mb: int) -> dict:
    """Allocate and touch `mb` MB, then free it: what the test of this module measures (a known own peak)."""
    import numpy as np

    a = np.ones(int(mb) * 2**20, np.uint8)
    total = int(a[:: 4096].sum())
    del a
    return {"touched_mb": int(mb), "pages": total}


def run_step(target: str, kwargs: dict, timeout_s: float | None = None, env: dict | None = None) -> dict:
    """Run `target` ("module:function" under locpath.bench) in a fresh child; its result dict, with `process`
    (own_process() read at the step's end) added. The child's progress (stderr) passes through."""
    if not target.startswith(ALLOWED) or ":" not in target:
        raise LocpathError(f"bench step {target!r}: not a locpath.bench function")
    proc = subprocess.run([sys.executable, "-m", "locpath.bench.child", target], input=json.dumps(kwargs),
                          stdout=subprocess.PIPE, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    lines = [ln for ln in (proc.stdout or "").splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise LocpathError(f"bench step {target} failed in its child process (exit {proc.returncode}; see its "
                           "messages above)")
    return json.loads(lines[-1])


def _main(target: str) -> int:
    mod_name, fn_name = target.split(":", 1)
    if not mod_name.startswith(ALLOWED):
        raise SystemExit(f"bench step {target!r}: not a locpath.bench function")
    kwargs = json.loads(sys.stdin.read() or "{}")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    real = os.fdopen(os.dup(1), "w")
    with contextlib.redirect_stdout(sys.stderr):  # the step's prints must not corrupt the JSON line
        if "log" in inspect.signature(fn).parameters:
            kwargs["log"] = lambda m: print(m, file=sys.stderr, flush=True)
        res = fn(**kwargs)
    res = dict(res or {})
    res["process"] = own_process()
    real.write(json.dumps(res, default=float) + "\n")
    real.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1]))
