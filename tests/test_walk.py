"""`data_prep.walk`: every entry under a tree is a file to read or is left out by category, symlinks included."""

import os

import pytest

from data_prep.walk import walk


@pytest.fixture
def tree(tmp_path):
    """A tree with every kind of symlink a user's dataset folder can hold."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real" / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "real" / "a.png").write_bytes(b"a")
    (root / "real" / "sub" / "b.png").write_bytes(b"b")
    (outside / "c.png").write_bytes(b"c")
    os.symlink(outside, root / "elsewhere")  # a folder outside the tree: followed
    os.symlink("real", root / "alias")  # a second path to real/: walked once, under real/
    os.symlink("..", root / "real" / "sub" / "up")  # points at an ancestor: would loop
    os.symlink("real/a.png", root / "link.png")  # a file link: followed
    os.symlink("missing.png", root / "dangling.png")
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    os.mkfifo(root / "pipe")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"x")
    return root


def test_symlinks_are_followed_or_reported(tree):
    found = walk(tree, prune=lambda rel: "hidden" if rel.startswith(".") else None)
    assert found.files == ["elsewhere/c.png", "link.png", "real/a.png", "real/sub/b.png"]
    assert found.left_out == {
        "broken_symlink": ["dangling.png"],
        "symlink_loop": ["loop_a", "loop_b", "real/sub/up"],
        "duplicate_folder_link": ["alias"],
        "not_a_regular_file": ["pipe"],
        "hidden": [".cache"],
    }
    assert found.count_left_out() == 7


def test_nothing_under_the_tree_is_lost(tree):
    """Every entry os.walk lists without following links is a file, left out, or a link whose files were read."""
    found = walk(tree)
    named = set(found.files) | {p for paths in found.left_out.values() for p in paths}
    for directory, subdirs, files in os.walk(tree):
        relative = os.path.relpath(directory, tree)
        for name in files + [d for d in subdirs if os.path.islink(os.path.join(directory, d))]:
            path = name if relative == "." else f"{relative}/{name}"
            followed = any(f.startswith(f"{path}/") for f in found.files)
            assert path in named or followed, f"{path} vanished"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_unreadable_folder_is_reported(tmp_path):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "x.png").write_bytes(b"x")
    os.chmod(tmp_path / "locked", 0)
    try:
        assert walk(tmp_path).left_out == {"unreadable": ["locked"]}
    finally:
        os.chmod(tmp_path / "locked", 0o755)
