"""Transparent huge pages for glibc malloc, so that XLA:CPU does not page-fault its scratch memory every step.

Why this exists. XLA's CPU runtime allocates an executable's temporary buffers as one block per call (about
680 MiB for the `tiny` MAE train step at batch 32, 346 MiB for twelve ViT-Ti blocks) and frees it when the
call returns. glibc serves any block above 32 MiB with a fresh `mmap` and gives it back with `munmap`, so every
step touches that memory for the first time again: about 190k page faults of 4 KiB and 0.6 CPU-seconds of
kernel time per tiny step on a 2-core VM, roughly a quarter of the step. Measured with `strace` (one mmap and
one munmap of the arena per call) and `getrusage` (minor faults per step).

With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) glibc asks the kernel for transparent huge pages
on those mappings (`madvise(MADV_HUGEPAGE)`), which turns the faults into about a thousand 2 MiB ones and
removes most of that kernel time. PyTorch's CPU step is unaffected by the setting (it reuses smaller blocks).
The tunable is read once, when the process starts, so an entry point calls `reexec_with_huge_page_malloc()`
first thing: when the setting is missing and would help, the process replaces itself (`os.execve`) with the
same command line and the tunable added. Nothing else in the environment changes.

It applies only where it helps: Linux with glibc >= 2.35 and transparent huge pages in `madvise` mode (in
`always` mode the kernel already does it; in `never` mode nothing can). Set USF_MAE_HOST_HUGEPAGES=0 to opt
out, e.g. under a debugger, where a re-exec would be in the way.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VARIABLE = "USF_MAE_HOST_HUGEPAGES"
REEXEC_MARKER = "USF_MAE_HOST_HUGEPAGES_REEXEC"
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # first glibc with the glibc.malloc.hugetlb tunable


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return None
    parts = name.split()
    if len(parts) != 2 or parts[0] != "glibc":
        return None
    numbers = parts[1].split(".")
    try:
        return int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 0
    except ValueError:
        return None


def transparent_huge_page_mode(path: str = THP_SYSFS) -> str | None:
    """The kernel's THP mode, the bracketed word of e.g. `always [madvise] never`; None if unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def plan(environ: dict, glibc: tuple[int, int] | None, thp_mode: str | None) -> tuple[bool, str]:
    """Whether to add the tunable, and a one-line reason either way (logged by the entry points)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return False, f"host malloc: GLIBC_TUNABLES already sets {tunables}"
    if environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False, f"host malloc: huge pages off ({OPT_OUT_VARIABLE}=0)"
    if glibc is None:
        return False, "host malloc: not glibc, left as it is"
    if glibc < MIN_GLIBC:
        return False, f"host malloc: glibc {glibc[0]}.{glibc[1]} predates the hugetlb tunable (2.35), left as it is"
    if thp_mode != "madvise":
        return False, f"host malloc: transparent huge pages are {thp_mode or 'unavailable'}, nothing to add"
    return True, f"host malloc: transparent huge pages requested ({TUNABLE})"


def with_tunable(environ: dict) -> dict:
    """A copy of `environ` with the hugetlb tunable appended to any GLIBC_TUNABLES already set."""
    env = dict(environ)
    existing = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{existing}:{TUNABLE}" if existing else TUNABLE
    env[REEXEC_MARKER] = "1"
    return env


def status() -> str:
    """One line for the logs: what the running process has, and why."""
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        how = "set by re-exec" if os.environ.get(REEXEC_MARKER) else "set by the caller"
        return f"host malloc: transparent huge pages on ({how})"
    return plan(os.environ, glibc_version(), transparent_huge_page_mode())[1]


def reexec_with_huge_page_malloc() -> None:
    """Restarts this process with the tunable when `plan` says it helps; returns without effect otherwise.

    Call it from an entry point's `__main__` block before any XLA computation: the re-exec'd process runs the
    same command line (`sys.orig_argv`) from the start, so nothing done before the call survives it.
    """
    if os.environ.get(REEXEC_MARKER):
        return  # already re-exec'd once; never loop, whatever the environment says
    apply, _ = plan(os.environ, glibc_version(), transparent_huge_page_mode())
    if not apply:
        return
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, with_tunable(os.environ))
