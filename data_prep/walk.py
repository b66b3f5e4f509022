"""Walks a source tree so that no file vanishes: symlinks are followed, the ones that cannot be are reported.

Every converter finds its inputs with `walk(root)`. `os.walk` and `Path.rglob` drop things silently: they do
not descend into symlinked folders, and a dangling or looping symlink is either skipped or later fails as
"file not found" without saying why. Here each entry under `root` ends up in exactly one place:

* `Tree.files`: regular files, and symlinks to regular files (followed), as sorted relative POSIX paths;
* `Tree.left_out[category]`: what cannot be read as a file, by category:
    - `broken_symlink`: a symlink whose target does not exist;
    - `symlink_loop`: a symlink that resolves to itself (ELOOP), or a symlinked folder that points at one
      of its own ancestors;
    - `duplicate_folder_link`: a symlinked folder whose target is walked under another path already;
    - `unreadable`: a folder or file the OS refuses to list or stat (permissions);
    - `not_a_regular_file`: FIFOs, sockets and device files;
    - any category returned by the caller's `prune(relative_dir)` hook, for folders deliberately not entered
      (hidden folders, unpacking leftovers); the folder itself is listed, not its contents.

Symlinked folders are followed once, after the real folders: a folder reached twice (same device and inode) is
walked under its first path only, preferring the real path to a link, so a link to an ancestor cannot loop and
a second path to the same data cannot duplicate records.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable

BROKEN_SYMLINK = "broken_symlink"
SYMLINK_LOOP = "symlink_loop"
DUPLICATE_FOLDER_LINK = "duplicate_folder_link"
UNREADABLE = "unreadable"
NOT_A_REGULAR_FILE = "not_a_regular_file"


@dataclasses.dataclass
class Tree:
    """What `walk` found: readable files, and everything else grouped by why it is not a file to read."""

    files: list[str]
    left_out: dict[str, list[str]]

    def leave_out(self, category: str, relative: str) -> None:
        self.left_out.setdefault(category, []).append(relative)

    def count_left_out(self) -> int:
        return sum(len(paths) for paths in self.left_out.values())


def _join(relative_dir: str, name: str) -> str:
    return name if not relative_dir else f"{relative_dir}/{name}"


def _is_ancestor(target: str, link: str) -> bool:
    """True when the folder `target` contains `link` (both absolute): following the link would loop."""
    target, parent = os.path.realpath(target), os.path.realpath(os.path.dirname(link))
    return parent == target or parent.startswith(target.rstrip(os.sep) + os.sep)


def walk(root: str | os.PathLike, prune: Callable[[str], str | None] | None = None) -> Tree:
    """Every entry under `root` (a folder), sorted; see the module docstring for where each one goes.

    `prune(relative_dir)` may return a category to leave a folder out without entering it, or None.
    """
    root = os.fspath(root)
    tree = Tree(files=[], left_out={})
    root_stat = os.stat(root)
    visited = {(root_stat.st_dev, root_stat.st_ino)}
    pending: list[str] = [""]  # real folders, walked first
    links: list[tuple[str, tuple[int, int]]] = []  # symlinked folders, walked once the real ones are done
    while pending or links:
        if pending:
            relative_dir = pending.pop()
        else:
            relative_dir, key = links.pop(0)
            full = os.path.join(root, relative_dir)
            if _is_ancestor(full, full):
                tree.leave_out(SYMLINK_LOOP, relative_dir)
                continue
            if key in visited:
                tree.leave_out(DUPLICATE_FOLDER_LINK, relative_dir)
                continue
            visited.add(key)
        try:
            with os.scandir(os.path.join(root, relative_dir)) as entries:
                names = sorted((entry.name, entry.is_symlink()) for entry in entries)
        except OSError:
            tree.leave_out(UNREADABLE, relative_dir or ".")
            continue
        subdirs = []
        for name, is_link in names:
            relative = _join(relative_dir, name)
            try:
                info = os.stat(os.path.join(root, relative))  # follows symlinks
            except OSError as err:
                if err.errno == errno.ENOENT and is_link:
                    tree.leave_out(BROKEN_SYMLINK, relative)
                elif err.errno == errno.ELOOP:
                    tree.leave_out(SYMLINK_LOOP, relative)
                else:
                    tree.leave_out(UNREADABLE, relative)
                continue
            if stat.S_ISDIR(info.st_mode):
                category = prune(relative) if prune is not None else None
                key = (info.st_dev, info.st_ino)
                if category is not None:
                    tree.leave_out(category, relative)
                elif is_link:
                    links.append((relative, key))
                elif key in visited:  # a bind mount of a folder walked already
                    tree.leave_out(DUPLICATE_FOLDER_LINK, relative)
                else:
                    visited.add(key)
                    subdirs.append(relative)
            elif stat.S_ISREG(info.st_mode):
                tree.files.append(relative)
            else:
                tree.leave_out(NOT_A_REGULAR_FILE, relative)
        pending.extend(reversed(subdirs))
    tree.files.sort()
    for paths in tree.left_out.values():
        paths.sort()
    return tree
