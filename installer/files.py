"""Files the installer owns: compare first, then write atomically (temp file in the same
directory, fsync, rename, fsync the directory). Identical content is never rewritten, so a
re-run leaves every mtime alone; a dry run prints a unified diff instead of writing.
"""

from __future__ import annotations

import difflib
import os
import stat
import tempfile
from pathlib import Path

from installer.context import Context
from installer.errors import StepFailed
from installer.layout import GROUP, USER


def _owner_ok(ctx: Context, path: Path, owner: str) -> bool:
    """Is `path` owned by `owner` (a user name, group = same name)? Under --root the
    files belong to whoever runs the tests, so ownership is taken as right there; it is
    set (recorded) whenever a file is created or rewritten."""
    if ctx.root is not None:
        return True
    entry = ctx.runner.getent("passwd", owner)
    if entry is None:
        return False
    st = path.lstat()
    return str(st.st_uid) == entry[2] and str(st.st_gid) == entry[3]


def chown(ctx: Context, path: Path, *, recursive: bool = False, owner: str = USER) -> None:
    # -h: never follow a symlink someone may have planted in a directory hal0 owns.
    flags = ["-R"] if recursive else ["-h"]
    ctx.runner.run(["chown", *flags, f"{owner}:{GROUP}", str(path)])


def show_diff(ctx: Context, path: Path, old: bytes | None, new: bytes) -> None:
    label = str(path)
    try:
        old_text = (old or b"").decode().splitlines(keepends=True)
        new_text = new.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        ctx.note(f"would write {label} ({len(new)} bytes, binary)")
        return
    diff = difflib.unified_diff(old_text, new_text,
                                fromfile=label if old is not None else "/dev/null",
                                tofile=label)
    ctx.note(f"would {'change' if old is not None else 'create'} {label}:")
    for line in diff:
        ctx.note("  " + line.rstrip("\n"))


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_file(ctx: Context, path: Path, content: str | bytes, *, mode: int = 0o644,
               owner: str | None = None, secret: bool = False) -> bool:
    """Make `path` hold `content` with `mode` (and `owner`). Returns True when something
    changed (or, in a dry run, would change). `secret` hides the content from diffs."""
    data = content.encode() if isinstance(content, str) else content
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = None
    if old == data:
        return _settle(ctx, path, mode, owner)
    if ctx.dry_run:
        if secret:
            ctx.note(f"would {'rewrite' if old is not None else 'create'} {path} "
                     f"(mode {mode:o}; content not shown: it holds a secret)")
        else:
            show_diff(ctx, path, old, data)
        return True
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode)
    if owner:
        chown(ctx, path, owner=owner)
    return True


def _settle(ctx: Context, path: Path, mode: int, owner: str | None) -> bool:
    """Fix the mode and owner of something that already exists. True when changed."""
    changed = False
    if stat.S_IMODE(path.stat().st_mode) != mode:
        changed = True
        if ctx.dry_run:
            ctx.note(f"would chmod {mode:o} {path}")
        else:
            os.chmod(path, mode)
    if owner and not _owner_ok(ctx, path, owner):
        changed = True
        chown(ctx, path, owner=owner)
    return changed


def ensure_dir(ctx: Context, path: Path, *, mode: int = 0o755, owner: str | None = None) -> bool:
    """Make sure `path` is a directory with `mode` (and `owner`). True when changed."""
    if path.is_dir():
        return _settle(ctx, path, mode, owner)
    if path.exists() or path.is_symlink():
        raise StepFailed(f"{path} exists and is not a directory",
                         f"move {path} out of the way and re-run")
    if ctx.dry_run:
        ctx.note(f"would create directory {path} (mode {mode:o}"
                 f"{', owner ' + owner if owner else ''})")
        return True
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    ctx.note(f"created {path}")
    if owner:
        chown(ctx, path, owner=owner)
    return True
