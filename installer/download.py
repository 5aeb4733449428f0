"""Getting lemond onto the box: fetch the release tarball (streamed, with progress, hashed
on the fly), check its sha256, unpack it safely beside the target and swap it in.

Every temporary thing lives beside `/opt/lemonade` (same filesystem, so the final rename
is atomic) and is removed on any error or Ctrl-C: a failed fetch or a bad hash leaves
`/opt/lemonade` exactly as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from installer.errors import StepFailed

CHUNK = 256 * 1024


# --- fetching ------------------------------------------------------------------------
def local_path(source: str) -> Path | None:
    """The file a --tarball names (a path or file:// URL); None for an http(s) URL."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(source)


def _chunks(source: str) -> Iterator[tuple[int | None, bytes]]:
    """Yield (total size or None, chunk) pairs from a path, file:// or http(s) URL."""
    local = local_path(source)
    if local is not None:
        with open_local(local) as fh:
            total = os.fstat(fh.fileno()).st_size
            while chunk := fh.read(CHUNK):
                yield total, chunk
        return
    timeout = httpx.Timeout(30.0, read=60.0)
    try:
        with httpx.Client(trust_env=False, follow_redirects=True, timeout=timeout) as client, \
                client.stream("GET", source) as response:
            if response.status_code != 200:
                raise StepFailed(f"download failed: HTTP {response.status_code} from {source}",
                                 "check the URL (or pass --tarball with a local copy)")
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            for chunk in response.iter_bytes(CHUNK):
                received += len(chunk)
                yield total, chunk
            if total is not None and received < total:
                raise StepFailed(f"download truncated: got {received} of {total} bytes",
                                 "check the network and re-run; nothing was kept")
    except httpx.HTTPError as exc:
        raise StepFailed(f"download failed: {exc or type(exc).__name__}",
                         "check the network (or download the tarball elsewhere and pass "
                         "--tarball PATH)") from None


class _Progress:
    """A rich progress bar on a terminal; otherwise plain lines every few seconds (and at
    each quarter), so CI logs and piped output still show the download moving."""

    def __init__(self, out, label: str):
        self.out, self.label = out, label
        self.start = time.monotonic()
        self.done = 0
        self.total: int | None = None
        self._rich = None
        self._task = None
        self._last_line = self.start
        self._last_quarter = 0

    def __enter__(self):
        if self.out.tty:
            self._rich = Progress(TextColumn("       {task.description}"), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(),
                                  TimeRemainingColumn(), console=Console(file=self.out.raw),
                                  transient=False)
            self._rich.__enter__()
            self._task = self._rich.add_task(self.label, total=None)
        return self

    def advance(self, total: int | None, n: int) -> None:
        self.done += n
        self.total = total
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, total=total)
            return
        now = time.monotonic()
        quarter = self.done * 4 // total if total else -1
        if now - self._last_line >= 5 or (total and quarter > self._last_quarter):
            self._last_line, self._last_quarter = now, quarter
            self._plain()

    def _plain(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed
        if self.total:
            pct = f" ({self.done * 100 // self.total}%)"
            eta = f", ETA {(self.total - self.done) / rate:.0f} s" if rate else ""
            size = f"{_size(self.done)} / {_size(self.total)}{pct}"
        else:
            size, eta = _size(self.done), ""
        self.out.line(f"       {self.label}: {size}, {_size(rate)}/s{eta}")

    def __exit__(self, exc_type, exc, tb):
        if self._rich is not None:
            self._rich.__exit__(exc_type, exc, tb)
        elif exc_type is None and self.done and self._last_quarter != 4:
            self._plain()
        return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fetch(source: str, workdir: Path, out) -> tuple[Path, str]:
    """Stream `source` into a temporary file in `workdir`; return (path, sha256 hex).
    The file is removed on any error, including Ctrl-C."""
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".lemonade-download-", suffix=".tar.gz")
    digest = hashlib.sha256()
    name = "copy" if local_path(source) is not None else "download"
    try:
        with os.fdopen(fd, "wb") as fh, _Progress(out, name) as progress:
            for total, chunk in _chunks(source):
                fh.write(chunk)
                digest.update(chunk)
                progress.advance(total, len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp), digest.hexdigest()


def open_local(path: Path):
    """Open a local --tarball for reading; StepFailed (one message) when it cannot be, or
    when it is not a regular file: /dev/zero would never end and a FIFO would block
    forever, so both are refused before a byte is read (O_NONBLOCK keeps the open itself
    from waiting for a FIFO's writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StepFailed(f"cannot read the --tarball {path}: {exc.strerror}",
                         "check the --tarball path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StepFailed(f"cannot read the --tarball {path}: not a regular file",
                         "pass the path of the downloaded .tar.gz file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open_local(path) as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- unpacking ---------------------------------------------------------------------------
def _clean_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _strip_prefix(members: list[tarfile.TarInfo]) -> str:
    """The single top folder every member sits in ("" when there is none)."""
    names = [_clean_name(m.name).rstrip("/") for m in members]
    names = [n for n in names if n and n != "."]
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1:
        return ""
    top = tops.pop()
    if any(n == top for n, m in zip(names, members, strict=False) if not m.isdir()):
        return ""  # the archive is a single file, not a folder
    return top + "/"


def _unsafe(name: str) -> str | None:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "'..' in path"
    return None


def check_members(members: list[tarfile.TarInfo]) -> None:
    """Refuse the whole archive when any member could land outside the target, or could
    not be unpacked at all (a hard link to a member that is not in the archive before it)."""
    seen: set[str] = set()
    for m in members:
        name = _clean_name(m.name)
        reason = _unsafe(name)
        if reason is None and (m.issym() or m.islnk()):
            link = m.linkname
            if m.issym():
                target = PurePosixPath(name).parent / link
                if link.startswith("/") or _escapes(target):
                    reason = f"link to {link!r} escapes the target"
            elif _unsafe(_clean_name(link)):
                reason = f"hard link to {link!r} escapes the target"
            elif _clean_name(link).rstrip("/") not in seen:
                reason = f"hard link to {link!r}, which is not an earlier file in the archive"
        if reason is None and not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            reason = "device or special file"
        if reason:
            raise StepFailed(f"refusing the tarball: member {m.name!r} ({reason})",
                             "the tarball is damaged or not a lemonade release; fetch a "
                             "fresh copy from the release page")
        if m.isfile() or m.islnk():
            seen.add(name.rstrip("/"))


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in (".", ""):
            depth += 1
    return False


# The embeddable release unpacks to well under 200 MiB; five times that is room for
# growth, and stops a gzip bomb (3 MB that unpack to 3 GiB) before it fills the disk.
MAX_UNPACKED = 1024 ** 3


def _read_members(tar: tarfile.TarFile, tarball: Path) -> list[tarfile.TarInfo]:
    """Every member, counting the bytes they would unpack to; stops at the first header
    that passes MAX_UNPACKED, so a bomb is refused without reading it all."""
    members, total = [], 0
    for member in tar:
        total += member.size if member.isfile() else 0
        if total > MAX_UNPACKED:
            raise StepFailed(f"refusing the tarball {tarball}: it unpacks to more than "
                             f"{_size(MAX_UNPACKED)}, far more than a lemonade release",
                             "the tarball is damaged or not a lemonade release; fetch a "
                             "fresh copy from the release page")
        members.append(member)
    return members


def _executable_lemond(members: list[tarfile.TarInfo], prefix: str) -> bool:
    """Will the unpacked tree have an executable `lemond` at its top (a file, or a link
    to one inside the archive)?"""
    by_name = {_clean_name(m.name).rstrip("/"): m for m in members}
    name = prefix + "lemond"
    for _ in range(8):  # a chain of links, but not a loop
        member = by_name.get(name)
        if member is None:
            return False
        if member.isfile():
            return bool(member.mode & 0o100)
        if member.islnk():
            name = _clean_name(member.linkname).rstrip("/")
        elif member.issym():
            name = str(PurePosixPath(os.path.normpath(
                PurePosixPath(name).parent / member.linkname)))
        else:
            return False
    return False


def _open_archive(tarball: Path):
    """Open a tarball; reading errors become one StepFailed."""
    try:
        return tarfile.open(tarball, "r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise StepFailed(f"cannot unpack the tarball: {exc}",
                         "the download is probably damaged; re-run to fetch it again") from None


def _checked(tar: tarfile.TarFile, tarball: Path) -> tuple[list[tarfile.TarInfo], str]:
    """Every check an archive must pass before a byte of it is written: (members, the
    top folder prefix). The dry run and the real run both come through here."""
    members = _read_members(tar, tarball)
    check_members(members)
    prefix = _strip_prefix(members)
    if not _executable_lemond(members, prefix):
        raise StepFailed("the tarball has no executable `lemond` at its top",
                         "is this a lemonade-embeddable release tarball?")
    return members, prefix


def inspect(tarball: Path) -> str:
    """Run every check `extract` runs, without unpacking; return the top folder's name
    ("" when there is none). StepFailed says why a real install would refuse it."""
    try:
        with _open_archive(tarball) as tar:
            _, prefix = _checked(tar, tarball)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise StepFailed(f"cannot unpack the tarball: {exc}",
                         "the download is probably damaged; re-run to fetch it again") from None
    return prefix.rstrip("/")


def extract(tarball: Path, dest: Path) -> str:
    """Unpack `tarball` into the empty directory `dest`, its top folder stripped; return
    that folder's name ("" when there is none)."""
    try:
        with _open_archive(tarball) as tar:
            members, prefix = _checked(tar, tarball)

            def strip(member: tarfile.TarInfo, path: str):
                name = _clean_name(member.name)
                if prefix:
                    if name.rstrip("/") + "/" == prefix:
                        return None  # the top folder itself
                    name = name[len(prefix):]
                changes = {"name": name}
                link = _clean_name(member.linkname)
                if member.islnk() and prefix and link.startswith(prefix):
                    changes["linkname"] = link[len(prefix):]
                # tarfile's own "data" filter is the second line of defence.
                return tarfile.data_filter(member.replace(**changes, deep=False), path)

            tar.extractall(dest, members=members, filter=strip)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise StepFailed(f"cannot unpack the tarball: {exc}",
                         "the download is probably damaged; re-run to fetch it again") from None
    return prefix.rstrip("/")


def write_new(path: Path, text: str) -> None:
    """Write `text` to `path` as a new file, never through whatever is there: a symlink
    planted in the archive under that name (say, to `lemond`) is removed, not followed."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


# --- swapping in ---------------------------------------------------------------------------
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def swap_in(staging: Path, target: Path) -> None:
    """Put `staging` at `target` in one step; the old tree is removed afterwards."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging)  # now holds the old tree
        return
    old = target.with_name(f".{target.name}-old-{os.getpid()}")
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old)
