"""Expected user errors, and the one rule every command line follows when it meets one.

Every entry point (`launch.py`, `python -m data_prep ...`, `python -m usf_mae_jax.interop ...`, `embed`,
`crossval`) runs its work through `run_cli`:

  * an *expected* user error — a bad argument or config value, a missing or unreadable file, a wrong
    dataset layout, an unsafe or unrecognised checkpoint, a full disk — prints ONE line,
    `<prog>: <what is wrong>`, and exits with status 2 (1 for a full disk or another OS-level failure);
  * with `--verbose` the same error shows its full traceback instead;
  * anything else is a bug and keeps its traceback, so it can be reported.

Library code marks an error as expected by raising a `UserError` subclass. The subclasses also derive from
the builtin they refine (`ConfigError` is a `ValueError`, `MissingInputError` a `FileNotFoundError`), so
callers that catch the builtin keep working.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

USER_ERROR_STATUS = 2
OS_ERROR_STATUS = 1


class UserError(Exception):
    """A mistake in what the user asked for or gave us; reported in one line, without a traceback."""


class ConfigError(UserError, ValueError):
    """A config value, preset argument or command-line option that cannot work."""


class DataError(UserError, ValueError):
    """Input data that is missing, empty, mislaid out or unreadable as a whole."""


class MissingInputError(UserError, FileNotFoundError):
    """A path the user named does not exist (or lacks what it must contain)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is unsafe, unrecognised, incompatible with the config, or corrupt."""


def one_line(message: str) -> str:
    """Collapses a multi-line message into one line (`; `-joined), so an error never spills over."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts)


def describe_os_error(err: OSError) -> str:
    """`<strerror>: <file>` for OS errors, with a hint for the ones users can fix (disk full, permissions)."""
    where = err.filename if err.filename is not None else ""
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    text = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        text += " (the disk is full: free space or choose another output folder)"
    elif err.errno in (errno.EACCES, errno.EPERM):
        text += " (check the permissions)"
    elif err.errno == errno.EROFS:
        text += " (the file system is read-only)"
    return f"{text}: {where}" if where else text


def is_expected_os_error(err: BaseException) -> bool:
    """OS-level failures a user can act on: missing files, permissions, full or read-only disks."""
    return isinstance(err, OSError) and err.errno in (
        errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
        errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST)


def report(prog: str, err: BaseException) -> int:
    """Prints the one-line report of an expected error to stderr; returns the exit status to use."""
    if isinstance(err, UserError) or not isinstance(err, OSError):
        print(f"{prog}: {one_line(str(err))}", file=sys.stderr)
        return USER_ERROR_STATUS
    print(f"{prog}: {one_line(describe_os_error(err))}", file=sys.stderr)
    return OS_ERROR_STATUS


def run_cli(work: Callable[[], int | None], prog: str, verbose: bool = False) -> int:
    """Runs `work()` under the one-line-error rule (module docstring); returns the process exit status."""
    try:
        status = work()
    except (UserError, OSError) as err:
        if verbose or (isinstance(err, OSError) and not isinstance(err, UserError)
                       and not is_expected_os_error(err)):
            raise
        return report(prog, err)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


def define_verbose_flag() -> None:
    """Defines absl's `--verbose` once, for every absl entry point imported into one process."""
    from absl import flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show the traceback of expected errors too (bad config, missing files).")


def verbose_requested(argv: list[str]) -> bool:
    """True when `--verbose` (or `-v`) is on the command line, for entry points that parse it late."""
    return any(a in ("--verbose", "-v", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)
