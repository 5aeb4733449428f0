"""`manage.py install` end to end under `--root`, plus its pure parts.

Every test installs into a temporary directory: system commands are recorded (never run),
the lemond tarball is built here and served from a loopback HTTP server, and the hal0 step
runs its real child process (migrate, collectstatic, admin) against a SQLite file in the
temporary tree. Nothing here needs root or touches /opt, /etc or /var/lib.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import sqlite3
import tarfile
import threading
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from installer import download, lemond_config, steps, usermodels
from installer.context import Options, Output
from installer.errors import StepFailed
from installer.layout import LEMOND_SHA256
from installer.steps import Installer
from installer.units import env_content, parse_env, render_units
from tests.harness import free_port

GOLDEN = Path(__file__).parent / "installer_golden"
TOP = "lemonade-embeddable-10.6.0-ubuntu-x64"


# --- helpers and fixtures ----------------------------------------------------------------
def make_tarball(path: Path, extra: list[tarfile.TarInfo] | None = None, blob: int = 600_000,
                 top_name: str = TOP):
    """A small stand-in for the embeddable release: a top folder with an executable
    `lemond`, `lemonade`, LICENSE and resources/, plus optional hostile members."""

    def add(tar, name, data: bytes, mode=0o644):
        info = tarfile.TarInfo(f"{top_name}/{name}")
        info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        top = tarfile.TarInfo(top_name)
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(top)
        add(tar, "lemond", b"#!/bin/sh\necho lemond \"$@\"\n", 0o755)
        add(tar, "lemonade", b"#!/bin/sh\necho lemonade\n", 0o755)
        add(tar, "LICENSE", b"Apache-2.0\n")
        add(tar, "resources/defaults.json", b'{"port": 13305}\n')
        add(tar, "resources/server_models.json", b"{}\n")
        # incompressible filler so the download takes several chunks (progress lines)
        add(tar, "resources/blob.bin", hashlib.sha256(b"x").digest() * (blob // 32))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"evil\n") if info.isfile() else None)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    return make_tarball(tmp_path_factory.mktemp("tarball") / f"{TOP}.tar.gz")


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path in ("/api/health", "/live"):
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        name = self.path.lstrip("/")
        truncated = name.startswith("truncated/")
        data = self.files.get(name.removeprefix("truncated/"))
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # a truncated download: the length promises everything, half arrives
        self.wfile.write(data[: len(data) // 2] if truncated else data)
        self.wfile.flush()
        if truncated:
            self.close_connection = True


@pytest.fixture(scope="module")
def server(tarball):
    """A loopback HTTP server: /<tarball name>, /truncated/<tarball name>, /api/health."""
    _Handler.files = {tarball[0].name: tarball[0].read_bytes()}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def install(*args) -> tuple[int, str]:
    """Run `manage.py install ARGS`; (exit code, output)."""
    out = io.StringIO()
    try:
        call_command("install", *map(str, args), stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + f"\nCommandError: {exc}"
    return 0, out.getvalue()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: kind, content hash / link target, mode."""
    result = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            result[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            result[rel] = ("dir", st.st_mode)
        else:
            result[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode)
    return result


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns
            for p in root.rglob("*") if not p.is_dir()}


def recorded(root: Path) -> list[str]:
    log = root / ".hal0-install/recorded-commands.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="module")
def installed(tmp_path_factory, tarball, server):
    """One full install from the loopback server, then a second run; shared read-only.
    Tests that change the tree work on a copy (`installed_copy`)."""
    root = tmp_path_factory.mktemp("installed") / "root"
    root.mkdir()
    url = f"{server}/{tarball[0].name}"
    code1, out1 = install("--root", root, "--tarball", url, "--sha256", tarball[1])
    before = (snapshot(root), mtimes(root), recorded(root))
    code2, out2 = install("--root", root, "--tarball", url, "--sha256", tarball[1])
    return {"root": root, "url": url, "first": (code1, out1), "second": (code2, out2),
            "before": before}


@pytest.fixture
def installed_copy(installed, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(installed["root"], root, symlinks=True)
    return root


# --- the full install ----------------------------------------------------------------------
def test_first_run_builds_the_tree(installed, tarball):
    code, out = installed["first"]
    root = installed["root"]
    assert code == 0, out
    for n in range(1, 11):
        assert f"[{n}/10] " in out
    assert "[4/10] lemond v10.6.0 … changed" in out
    assert "(100%)" in out and "/s" in out  # plain progress lines: bytes, %, rate, ETA
    assert "ETA" in out
    assert f"sha256 ok ({tarball[1]})" in out
    # extracted with the top folder stripped, executable, marker written
    lemond = root / "opt/lemonade/lemond"
    assert lemond.is_file() and os.access(lemond, os.X_OK)
    assert (root / "opt/lemonade/resources/defaults.json").is_file()
    assert not (root / "opt/lemonade" / TOP).exists()
    assert (root / "opt/lemonade/.installed-version").read_text().split() == [
        "10.6.0", "sha256", tarball[1]]
    assert not list((root / "opt").glob(".lemonade-*"))  # no temporary leftovers
    # config baseline
    config = json.loads((root / "var/lib/hal0/lemonade/config.json").read_text())
    threads = lemond_config.llamacpp_threads(lemond_config.cpu_count())
    assert config == {
        "config_version": 1, "host": "127.0.0.1", "port": 13305, "max_loaded_models": 4,
        "rocm_channel": "stable", "llamacpp": {"args": f"--parallel 1 --threads {threads}"},
        "flm": {"args": "--asr 1 --embed 1"}, "kokoro": {"cpu_bin": "builtin"},
    }
    assert oct((root / "var/lib/hal0/lemonade/config.json").stat().st_mode & 0o777) == "0o644"
    # units, env file (0600, secret), wants links from the simulated `systemctl enable`
    for unit in ("hal0-lemonade.service", "hal0-api.service"):
        assert (root / "etc/systemd/system" / unit).is_file()
        assert (root / "etc/systemd/system/multi-user.target.wants" / unit).is_symlink()
    env_file = root / "etc/hal0/hal0.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    env = parse_env(env_file.read_text())
    assert len(env["HAL0_SECRET_KEY"]) >= 50 and env["HAL0_DEBUG"] == "0"
    assert env["DATABASE_URL"] == "sqlite:////var/lib/hal0/hal0.sqlite3"
    # hal0 itself: database migrated with the seeded slots, static files, an admin
    db = sqlite3.connect(root / "var/lib/hal0/hal0.sqlite3")
    assert db.execute("select count(*) from slots_slot").fetchone()[0] == 6
    assert db.execute("select count(*) from auth_user where is_superuser").fetchone()[0] == 1
    db.close()
    assert (root / "var/lib/hal0/static/staticfiles.json").is_file()
    assert "Created admin login: admin / " in out
    # the system user, simulated in the tree's etc/passwd
    assert (root / "etc/passwd").read_text().startswith(
        "hal0:x:999:999::/var/lib/hal0:/usr/sbin/nologin")


def test_first_run_records_the_system_commands_in_order(installed):
    root = installed["root"]
    commands = installed["before"][2]
    assert commands[0] == ("useradd --system --home-dir /var/lib/hal0 --no-create-home "
                           "--shell /usr/sbin/nologin --user-group hal0")
    assert f"chown -h hal0:hal0 {root}/var/lib/hal0" in commands
    assert f"chown -R hal0:hal0 {root}/opt/lemonade" in commands
    assert f"chown -h hal0:hal0 {root}/var/lib/hal0/lemonade/config.json" in commands
    assert commands[-3:] == ["systemctl daemon-reload",
                             "systemctl enable --now hal0-lemonade.service",
                             "systemctl enable --now hal0-api.service"]


def test_second_run_changes_nothing_and_is_fast(installed):
    code, out = installed["second"]
    root = installed["root"]
    assert code == 0, out
    assert out.count("… already in place") == 8
    assert "Everything was already in place." in out
    assert "fetching" not in out and "%" not in out  # downloaded nothing
    snap, times, commands = installed["before"]
    assert snapshot(root) == snap
    assert mtimes(root) == times  # no file rewritten
    assert recorded(root) == commands  # no system command recorded
    # "fast" is what it skipped (no download, no rewrite, no command above); its seconds are
    # a benchmark's business, not a timed assertion on a shared CI machine.


def test_wrong_sha256_on_an_installed_tree_changes_nothing(installed_copy, installed):
    before = snapshot(installed_copy)
    code, out = install("--root", installed_copy, "--tarball", installed["url"],
                        "--sha256", "ab" * 32)
    assert code == 1
    assert "sha256 mismatch" in out and "ab" * 32 in out
    assert "what to check" in out and "re-run just this step: " in out
    assert snapshot(installed_copy) == before


def test_wrong_sha256_of_a_local_tarball_stops_before_any_change(tmp_path, tarball):
    root = tmp_path / "root"
    root.mkdir()
    code, out = install("--root", root, "--tarball", tarball[0], "--sha256", "cd" * 32)
    assert code == 1
    assert "expected " + "cd" * 32 in out and "actual   " + tarball[1] in out
    assert "[1/10] preflight checks … FAILED" in out
    assert list(root.iterdir()) == []


def test_hash_mismatch_after_download_changes_nothing_under_opt_lemonade(tmp_path, server,
                                                                            tarball):
    root = tmp_path / "root"
    code, out = install("--root", root, "--tarball", f"{server}/{tarball[0].name}",
                        "--sha256", "ef" * 32)
    assert code == 1
    assert "[4/10] lemond v10.6.0 … FAILED" in out
    assert "expected " + "ef" * 32 in out and "actual   " + tarball[1] in out
    assert list((root / "opt/lemonade").iterdir()) == []
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["lemonade"]


def test_truncated_download_leaves_no_file_behind(tmp_path, server, tarball):
    root = tmp_path / "root"
    code, out = install("--root", root, "--only", "lemond", "--tarball",
                        f"{server}/truncated/{tarball[0].name}", "--sha256", tarball[1])
    assert code == 1, out
    assert "[4/10] lemond v10.6.0 … FAILED" in out
    assert "install --only lemond" in out
    assert [p.name for p in (root / "opt").iterdir()] == []


def test_interrupted_download_is_removed(tmp_path, tarball, monkeypatch):
    def chunks(source):
        yield 10_000, b"x" * 1000
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_chunks", chunks)
    root = tmp_path / "root"
    code, out = install("--root", root, "--only", "lemond", "--tarball",
                        "http://127.0.0.1:9/x.tar.gz", "--sha256", tarball[1])
    assert code == 130
    assert "Interrupted" in out
    assert list((root / "opt").iterdir()) == []


@pytest.mark.parametrize("member", ["../evil", "/etc/evil", "link", "hardlink"])
def test_tarball_with_an_escaping_member_is_refused(tmp_path, member):
    info = tarfile.TarInfo(f"{TOP}/{member}" if member[0] not in "./" else member)
    if member == "../evil":
        info = tarfile.TarInfo(f"{TOP}/../../evil")
    if member == "link":
        info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    elif member == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "../outside"
    else:
        info.size = 5
    path, sha = make_tarball(tmp_path / "evil.tar.gz", extra=[info], blob=1000)
    root = tmp_path / "root"
    code, out = install("--root", root, "--only", "lemond", "--tarball", path, "--sha256", sha)
    assert code == 1, out
    assert "refusing the tarball" in out
    assert "[1/10] preflight checks … FAILED" in out  # a local tarball: before any change
    assert not (root / "opt").exists()
    assert not (tmp_path / "evil").exists()


def _member(name: str, *, kind=tarfile.REGTYPE, link: str = "", size: int = 5,
            mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"{TOP}/{name}")
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


def _no_lemond(path: Path) -> tuple[Path, str]:
    """A release-looking tarball whose `lemond` is not executable."""
    with tarfile.open(path, "w:gz") as tar:
        info = _member("lemond", size=3)
        tar.addfile(info, io.BytesIO(b"hi\n"))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _not_a_tarball(path: Path) -> tuple[Path, str]:
    path.write_bytes(b"<html>not found</html>\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


# Tarballs a real run refuses, with what it says; the dry run must refuse each the same way.
REFUSED = {
    "escaping member": (lambda p: make_tarball(p, [tarfile.TarInfo("../evil")], blob=1000),
                        "'..' in path"),
    "device": (lambda p: make_tarball(p, [_member("dev", kind=tarfile.CHRTYPE)], blob=1000),
               "device or special file"),
    "hard link to a missing member": (
        lambda p: make_tarball(p, [_member("lib.so", kind=tarfile.LNKTYPE,
                                           link=f"{TOP}/missing.so")], blob=1000),
        "which is not an earlier file in the archive"),
    "lemond not executable": (_no_lemond, "the tarball has no executable `lemond`"),
    "not a tarball": (_not_a_tarball, "cannot unpack the tarball"),
    "another version": (
        lambda p: make_tarball(p, blob=1000, top_name="lemonade-embeddable-10.8.0-ubuntu-x64"),
        "the tarball holds lemond 10.8.0"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_dry_run_refuses_every_tarball_the_real_run_refuses(tmp_path, case):
    build, message = REFUSED[case]
    path, sha = build(tmp_path / "release.tar.gz")
    version = ["--lemond-version", "10.6.0"]  # the tarball must hold the version named
    root = tmp_path / "root"
    root.mkdir()
    code, out = install("--root", root, "--dry-run", "--only", "lemond", "--tarball", path,
                        "--sha256", sha, *version)
    assert code == 1, out
    assert "a real install would stop here: " in out and message in out
    assert "[1/10] preflight checks … would fail" in out
    assert list(root.iterdir()) == []
    code, out = install("--root", root, "--only", "lemond", "--tarball", path, "--sha256", sha,
                        *version)
    assert code == 1, out
    assert message in out and "Traceback" not in out
    assert list(root.iterdir()) == []  # refused in preflight, before any change


def test_a_hard_link_to_a_missing_member_is_a_clear_error_after_a_download(tmp_path, server,
                                                                           monkeypatch):
    """The path that cannot be checked before step 4 (a URL): extract refuses it too."""
    path, sha = make_tarball(tmp_path / "links.tar.gz", blob=1000, extra=[
        _member("lib.so", kind=tarfile.LNKTYPE, link=f"{TOP}/missing.so")])
    monkeypatch.setitem(_Handler.files, "links.tar.gz", path.read_bytes())
    root = tmp_path / "root"
    code, out = install("--root", root, "--only", "lemond", "--tarball",
                        f"{server}/links.tar.gz", "--sha256", sha)
    assert code == 1, out
    assert "[4/10] lemond v10.6.0 … FAILED" in out
    assert "hard link to 'lemonade-embeddable-10.6.0-ubuntu-x64/missing.so'" in out
    assert [p.name for p in (root / "opt").iterdir()] == []


def test_a_symlinked_marker_in_the_tarball_does_not_overwrite_lemond(tmp_path):
    marker = _member(".installed-version", kind=tarfile.SYMTYPE, link="lemond")
    path, sha = make_tarball(tmp_path / "marker.tar.gz", [marker], blob=1000)
    root = tmp_path / "root"
    code, out = install("--root", root, "--only", "lemond", "--tarball", path, "--sha256", sha)
    assert code == 0, out
    lemonade = root / "opt/lemonade"
    assert (lemonade / "lemond").read_bytes() == b"#!/bin/sh\necho lemond \"$@\"\n"
    assert not (lemonade / ".installed-version").is_symlink()
    assert (lemonade / ".installed-version").read_text().split() == ["10.6.0", "sha256", sha]


def test_a_gzip_bomb_is_refused_before_it_fills_the_disk(tmp_path, monkeypatch):
    # The cap, scaled down so the test stays small: 8 MiB of zeros is 8 KiB of gzip.
    monkeypatch.setattr(download, "MAX_UNPACKED", 4 * 1024 * 1024)
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_member("lemond", size=3, mode=0o755), io.BytesIO(b"hi\n"))
        zeros = 8 * 1024 * 1024
        tar.addfile(_member("resources/zeros", size=zeros), io.BytesIO(bytes(zeros)))
    assert path.stat().st_size < 100_000
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    root = tmp_path / "root"
    for args in (["--dry-run"], []):
        code, out = install("--root", root, *args, "--only", "lemond", "--tarball", path,
                            "--sha256", sha)
        assert code == 1, out
        assert "it unpacks to more than 4.0 MiB" in out
        assert not root.exists() or not (root / "opt/lemonade").exists()


def test_the_size_cap_is_a_multiple_of_a_release():
    assert download.MAX_UNPACKED >= 512 * 1024 * 1024


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory"])
def test_a_tarball_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    source = tmp_path / "release.tar.gz"
    if kind == "fifo":
        os.mkfifo(source)  # opening it would block until a writer comes
    elif kind == "directory":
        source.mkdir()
    else:
        source = Path(kind)  # reading it never ends
    root = tmp_path / "root"
    for args in (["--dry-run"], []):
        code, out = install("--root", root, *args, "--only", "lemond", "--tarball", source,
                            "--sha256", "cd" * 32)
        assert code == 1, out
        assert f"cannot read the --tarball {source}: " in out
        assert "not a regular file" in out or "Is a directory" in out


def test_placeholder_hash_needs_the_explicit_skip(tmp_path, tarball, monkeypatch):
    root = tmp_path / "root"
    args = ["--root", root, "--only", "lemond", "--tarball", tarball[0], "--sha256", "0" * 64]
    code, out = install(*args)
    assert code == 1 and "placeholder" in out
    assert not (root / "opt/lemonade").exists()
    monkeypatch.setenv("HAL0_SKIP_LEMONADE_SHA", "1")
    code, out = install(*args)
    assert code == 0, out
    assert "sha256 NOT checked" in out
    assert (root / "opt/lemonade/lemond").is_file()


def _no_fetch(source, workdir, out):
    raise AssertionError(f"fetched {source}")


def test_custom_tarball_install_is_kept_on_a_plain_rerun(tmp_path, monkeypatch):
    path, sha = make_tarball(tmp_path / "custom.tar.gz", blob=1000)
    assert sha != LEMOND_SHA256
    root = tmp_path / "root"
    code, out = install("--root", root, "--only", "lemond", "--tarball", path, "--sha256", sha)
    assert code == 0 and "[4/10] lemond v10.6.0 … changed" in out, out
    marker = root / "opt/lemonade/.installed-version"
    before = snapshot(root)
    monkeypatch.setattr(download, "fetch", _no_fetch)  # a re-download would fail the test
    for args in ([], ["--dry-run"]):
        code, out = install("--root", root, "--only", "lemond", *args)
        assert code == 0, out
        assert "[4/10] lemond v10.6.0 … already in place" in out
        assert f"lemond v10.6.0 already installed (from a tarball with sha256 {sha})" in out
        assert "would fetch" not in out and "fetching" not in out
    assert snapshot(root) == before
    assert marker.read_text().split() == ["10.6.0", "sha256", sha]


def _release_10_8(tmp_path) -> tuple[Path, str, Path, Path]:
    """A v10.8.0 release tarball, an empty root and where its marker goes."""
    path, sha = make_tarball(tmp_path / "custom.tar.gz", blob=1000,
                             top_name="lemonade-embeddable-10.8.0-ubuntu-x64")
    root = tmp_path / "root"
    return path, sha, root, root / "opt/lemonade/.installed-version"


def test_an_upgrade_to_another_version_is_kept_until_a_version_is_named(tmp_path, tarball,
                                                                         monkeypatch):
    path, sha, root, marker = _release_10_8(tmp_path)
    code, out = install("--root", root, "--only", "lemond", "--lemond-version", "10.8.0",
                        "--tarball", path, "--sha256", sha)
    assert code == 0 and "[4/10] lemond v10.8.0 … changed" in out, out
    assert marker.read_text().split() == ["10.8.0", "sha256", sha]
    before = snapshot(root)
    with monkeypatch.context() as patch:
        patch.setattr(download, "fetch", _no_fetch)  # a downgrade would fetch v10.6.0
        for args in ([], ["--dry-run"]):
            code, out = install("--root", root, "--only", "lemond", *args)
            assert code == 0, out
            assert "[4/10] lemond v10.8.0 … already in place" in out
            assert f"lemond v10.8.0 already installed (from a tarball with sha256 {sha}); " \
                   "kept" in out
            assert "would fetch" not in out and "fetching" not in out
    assert snapshot(root) == before
    # naming the pinned version replaces it (a dry run would fetch the pinned release)
    code, out = install("--root", root, "--only", "lemond", "--dry-run",
                        "--lemond-version", "10.6.0")
    assert code == 0 and "[4/10] lemond v10.6.0 … would change" in out, out
    assert "would fetch https://github.com/lemonade-sdk/lemonade/releases/download/v10.6.0/" in out
    code, out = install("--root", root, "--only", "lemond", "--lemond-version", "10.6.0",
                        "--tarball", tarball[0], "--sha256", tarball[1])
    assert code == 0 and "[4/10] lemond v10.6.0 … changed" in out, out
    assert marker.read_text().split() == ["10.6.0", "sha256", tarball[1]]


def test_the_marker_records_the_version_the_tarball_holds(tmp_path):
    path, sha, root, marker = _release_10_8(tmp_path)
    # another version named than the tarball holds: refused, nothing changed
    code, out = install("--root", root, "--only", "lemond", "--lemond-version", "10.9.0",
                        "--tarball", path, "--sha256", sha)
    assert code == 1 and "the tarball holds lemond 10.8.0" in out, out
    assert not (root / "opt/lemonade").exists()
    # no version named: the marker says what the tarball holds, not the pinned version
    code, out = install("--root", root, "--only", "lemond", "--tarball", path, "--sha256", sha)
    assert code == 0 and "installed lemond 10.8.0 into" in out, out
    assert marker.read_text().split() == ["10.8.0", "sha256", sha]


def test_an_explicitly_named_other_archive_replaces_the_installed_one(tmp_path, tarball):
    path, sha = make_tarball(tmp_path / "custom.tar.gz", blob=1000)
    root = tmp_path / "root"
    assert install("--root", root, "--only", "lemond", "--tarball", path, "--sha256", sha)[0] == 0
    # the same archive named again: kept, and no note (it is the one asked for)
    code, out = install("--root", root, "--only", "lemond", "--tarball", path, "--sha256", sha)
    assert code == 0 and "[4/10] lemond v10.6.0 … already in place" in out, out
    assert "already installed (from a tarball" not in out
    # another archive: installed; a bare --tarball means the pinned release, so its dry run
    # would fetch it
    code, out = install("--root", root, "--only", "lemond", "--dry-run", "--tarball",
                        "http://127.0.0.1:9/lemonade.tar.gz")
    assert code == 0 and f"would check sha256 {LEMOND_SHA256}" in out, out
    code, out = install("--root", root, "--only", "lemond", "--tarball", tarball[0],
                        "--sha256", tarball[1])
    assert code == 0 and "[4/10] lemond v10.6.0 … changed" in out, out
    assert (root / "opt/lemonade/.installed-version").read_text().split() == [
        "10.6.0", "sha256", tarball[1]]


def test_rich_progress_bar_on_a_terminal(tmp_path, tarball):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    fetched, digest = download.fetch(str(tarball[0]), tmp_path, Output(out))
    assert digest == tarball[1]
    text = out.getvalue()
    assert "copy" in text and "kB" in text and "\x1b[" in text  # rich: bar, bytes
    fetched.unlink()


# --- dry run --------------------------------------------------------------------------------
def test_dry_run_on_an_empty_root_changes_nothing(tmp_path, tarball):
    root = tmp_path / "root"
    root.mkdir()
    code, out = install("--root", root, "--dry-run", "--tarball", tarball[0],
                        "--sha256", tarball[1])
    assert code == 0, out
    assert list(root.iterdir()) == []
    assert "would run: useradd --system" in out
    assert "would run: systemctl enable --now hal0-lemonade.service" in out
    assert "+++ " + str(root / "var/lib/hal0/lemonade/config.json") in out
    assert '+  "max_loaded_models": 4,' in out
    assert "+ExecStart=/opt/lemonade/lemond /var/lib/hal0/lemonade" in out
    assert "content not shown: it holds a secret" in out


def test_dry_run_with_a_wrong_sha256_for_a_local_tarball_fails(tmp_path, tarball):
    root = tmp_path / "root"
    root.mkdir()
    code, out = install("--root", root, "--dry-run", "--tarball", tarball[0],
                        "--sha256", "cd" * 32)
    assert code == 1, out
    assert "a real install would stop here: sha256 mismatch for " + str(tarball[0]) in out
    assert "expected " + "cd" * 32 in out and "actual   " + tarball[1] in out
    assert "[1/10] preflight checks … would fail" in out
    assert "would check sha256" not in out and "Everything was already in place" not in out
    assert out.count("a real install would stop at step 1 (preflight)") == 1  # said once
    assert "dry run failed; see the summary above" in out  # the command's exit message
    assert list(root.iterdir()) == []


def test_dry_run_with_a_missing_local_tarball_fails(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    code, out = install("--root", root, "--dry-run", "--tarball", tmp_path / "nothing.tar.gz",
                        "--sha256", "cd" * 32)
    assert code == 1, out
    assert f"cannot read the --tarball {tmp_path / 'nothing.tar.gz'}" in out
    assert list(root.iterdir()) == []


def test_dry_run_with_a_right_sha256_for_a_local_tarball_checks_it(tmp_path, tarball):
    root = tmp_path / "root"
    code, out = install("--root", root, "--dry-run", "--only", "lemond", "--tarball",
                        tarball[0], "--sha256", tarball[1])
    assert code == 0, out
    assert f"sha256 ok ({tarball[1]})" in out
    assert "[4/10] lemond v10.6.0 … would change" in out
    assert not root.exists()


def test_dry_run_with_a_url_tarball_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch", _no_fetch)
    root = tmp_path / "root"
    code, out = install("--root", root, "--dry-run", "--only", "lemond", "--tarball",
                        "http://127.0.0.1:9/lemonade.tar.gz", "--sha256", "cd" * 32)
    assert code == 0, out
    assert "would fetch http://127.0.0.1:9/lemonade.tar.gz" in out
    assert "would check sha256 " + "cd" * 32 in out


def test_dry_run_on_an_installed_tree_shows_a_diff_and_changes_nothing(installed_copy,
                                                                         installed):
    before, times = snapshot(installed_copy), mtimes(installed_copy)
    code, out = install("--root", installed_copy, "--dry-run", "--tarball", installed["url"],
                        "--set", "max_loaded_models=2")
    assert code == 0, out
    assert '-  "max_loaded_models": 4,' in out and '+  "max_loaded_models": 2,' in out
    assert "[8/10] hal0 (database, static files, admin) … already in place" in out
    assert snapshot(installed_copy) == before
    assert mtimes(installed_copy) == times


# --- config and overrides ---------------------------------------------------------------------
@pytest.mark.parametrize(("nproc", "threads"), [
    (1, 2), (2, 2), (4, 2), (8, 2), (16, 3), (32, 7), (64, 15), (None, 2)])
def test_threads_table(nproc, threads):
    assert lemond_config.llamacpp_threads(nproc) == threads
    config, warnings = lemond_config.build({}, nproc)
    assert config["llamacpp"]["args"] == f"--parallel 1 --threads {threads}"
    assert bool(warnings) == (nproc is None)


def test_unknown_cpu_count_warns_and_still_sets_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(lemond_config, "cpu_count", lambda: None)
    root = tmp_path / "root"
    code, out = install("--root", root, "--only", "config")
    assert code == 0, out
    assert "could not tell how many CPUs" in out
    assert "[4/10] lemond v10.6.0 … skipped (--only)" in out
    config = json.loads((root / "var/lib/hal0/lemonade/config.json").read_text())
    assert config["llamacpp"]["args"] == "--parallel 1 --threads 2"


@pytest.mark.parametrize(("override", "expected"), [
    ("--ctx-size-draft 8", "--parallel 1 --ctx-size-draft 8 --threads 6"),
    ("--threads 12", "--parallel 1 --threads 12"),
    ("-t 3 --parallel 2", "-t 3 --parallel 2"),
    ("--parallel=4", "--parallel=4 --threads 6"),
    ("", "--parallel 1 --threads 6"),
])
def test_threads_survive_any_llamacpp_override(override, expected):
    config, _ = lemond_config.build({"llamacpp.args": override}, 26)
    assert config["llamacpp"]["args"] == expected


def test_overrides_are_kept_and_reapplied(tmp_path, monkeypatch):
    monkeypatch.setattr(lemond_config, "cpu_count", lambda: 32)
    root = tmp_path / "root"
    port = free_port()
    code, out = install("--root", root, "--only", "config,units",
                        "--set", "max_loaded_models=2", "--set", f"port={port}",
                        "--set", 'llamacpp.args=--no-mmap', "--set", "sdcpp.cfg_scale=5")
    assert code == 0, out
    config_path = root / "var/lib/hal0/lemonade/config.json"
    config = json.loads(config_path.read_text())
    assert config["max_loaded_models"] == 2 and config["port"] == port
    assert config["llamacpp"]["args"] == "--parallel 1 --no-mmap --threads 7"
    assert config["sdcpp"] == {"cfg_scale": 5}
    unit = (root / "etc/systemd/system/hal0-lemonade.service").read_text()
    assert f"http://127.0.0.1:{port}/internal/shutdown" in unit
    env = parse_env((root / "etc/hal0/hal0.env").read_text())
    assert env["HAL0_LEMONADE_URL"] == f"http://127.0.0.1:{port}"
    saved = config_path.read_bytes()
    # a later run without --set keeps them (and rewrites nothing)
    code, out = install("--root", root, "--only", "config")
    assert code == 0 and "[5/10] lemond config … already in place" in out
    assert config_path.read_bytes() == saved
    # --unset drops one, the rest stay
    code, out = install("--root", root, "--only", "config", "--unset", "max_loaded_models")
    assert code == 0, out
    config = json.loads(config_path.read_text())
    assert config["max_loaded_models"] == 4 and config["port"] == port


@pytest.mark.parametrize(("item", "message"), [
    ("nonsense.key=1", "lemond has no setting 'nonsense.key'"),
    ("max_loaded_models=many", "takes a whole number"),
    ("offline=1", "takes true/false"),
    ("llamacpp=x", "is a section"),
    ("port=70000", "not a TCP port"),
    ("novalue", "expected key.path=value"),
    ("sdcpp.cfg_scale=NaN", "not a finite number"),
    ("sdcpp.cfg_scale=Infinity", "not a finite number"),
])
def test_bad_set_exits_2_and_changes_nothing(tmp_path, item, message):
    root = tmp_path / "root"
    root.mkdir()
    code, out = install("--root", root, "--set", item)
    assert code == 2
    assert message in out
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["--sha256", "xyz"], ["--only", "nosuchstep"], ["--lemond-version", "10.7.0"],
    ["--only", "units", "--set", "port=1234"], ["--port", "0"],
])
def test_bad_usage_exits_2(tmp_path, args):
    root = tmp_path / "root"
    root.mkdir()
    code, _ = install("--root", root, *args)
    assert code == 2
    assert list(root.iterdir()) == []


# --- user, units, env -------------------------------------------------------------------------
def test_user_joins_render_and_video_once(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_text("render:x:105:\nvideo:x:44:alice\n")
    code, out = install("--root", root, "--only", "user")
    assert code == 0, out
    assert recorded(root)[-1] == "usermod --append --groups render,video hal0"
    assert "render:x:105:hal0\nvideo:x:44:alice,hal0\n" in (root / "etc/group").read_text()
    code, out = install("--root", root, "--only", "user")
    assert "[2/10] system user hal0 … already in place" in out
    assert len(recorded(root)) == 2


def test_existing_user_with_a_login_shell_is_fixed(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("hal0:x:990:990::/home/hal0:/bin/bash\n")
    (root / "etc/group").write_text("hal0:x:990:\n")
    code, out = install("--root", root, "--only", "user")
    assert code == 0, out
    assert recorded(root) == [
        "usermod --home /var/lib/hal0 --shell /usr/sbin/nologin hal0"]


def test_unit_files_match_the_golden_copies():
    units = render_units(lemond_port=13305, host="127.0.0.1", port=8000,
                         python="/opt/hal0/.venv/bin/python", base_dir=Path("/opt/hal0"))
    for name, text in units.items():
        assert text == (GOLDEN / name).read_text(), name
    lemonade = units["hal0-lemonade.service"].splitlines()
    for line in ("Type=simple", "ExecStart=/opt/lemonade/lemond /var/lib/hal0/lemonade",
                 "ExecStop=/usr/bin/curl -s -X POST http://127.0.0.1:13305/internal/shutdown",
                 "Restart=on-failure", "RestartSec=5s", "User=hal0", "Group=hal0",
                 "LimitMEMLOCK=infinity", "CPUQuota=80%", "WantedBy=multi-user.target"):
        assert line in lemonade
    api = units["hal0-api.service"].splitlines()
    assert "EnvironmentFile=/etc/hal0/hal0.env" in api
    assert any(ln.startswith("After=") and "hal0-lemonade.service" in ln for ln in api)
    assert any(ln.startswith("Wants=") and "hal0-lemonade.service" in ln for ln in api)


def test_installed_units_are_the_rendered_ones(installed):
    import sys

    from django.conf import settings

    units = render_units(lemond_port=13305, host="127.0.0.1", port=8000,
                         python=sys.executable, base_dir=settings.BASE_DIR)
    for name, text in units.items():
        assert (installed["root"] / "etc/systemd/system" / name).read_text() == text


def test_env_file_keeps_edits_and_the_secret():
    text, _ = env_content(None, 13305)
    secret = parse_env(text)["HAL0_SECRET_KEY"]
    edited = text.replace("HAL0_DEBUG=0\n", "") + "HAL0_ALLOWED_HOSTS=hal0.lan\n"
    again, notes = env_content(edited, 13305)
    values = parse_env(again)
    assert values["HAL0_SECRET_KEY"] == secret
    assert values["HAL0_ALLOWED_HOSTS"] == "hal0.lan" and values["HAL0_DEBUG"] == "0"
    assert notes == ["added HAL0_DEBUG"]
    assert env_content(again, 13305)[0] == again


# --- models -------------------------------------------------------------------------------------
def test_model_registration_plan():
    catalog = {"Qwen3-0.6B-GGUF": {"recipe": "llamacpp"}}
    slots = [
        {"model_name": "Qwen3-0.6B-GGUF", "capability": "chat", "device": "cpu"},
        {"model_name": "user.Mine", "capability": "embed", "device": "gpu-vulkan"},
        {"model_name": "user.Known", "capability": "chat", "device": "cpu"},
        {"model_name": "Custom-GGUF", "capability": "chat", "device": "cpu"},
        {"model_name": "Gemma3-1b-it-FLM", "capability": "chat", "device": "npu"},
        {"model_name": "user.Off", "capability": "chat", "device": "cpu", "enabled": False},
    ]
    plan = usermodels.plan(slots, catalog, {"Known": {"checkpoint": "a/b"}},
                           {"user.Mine": "org/mine-GGUF:Q8_0"})
    assert plan.add == {"Mine": {"checkpoint": "org/mine-GGUF:Q8_0", "recipe": "llamacpp",
                                 "labels": ["embeddings", "custom"]}}
    assert plan.present == ["user.Known"]
    assert plan.missing == ["Custom-GGUF"]
    assert plan.builtin == ["Qwen3-0.6B-GGUF", "Gemma3-1b-it-FLM"]


def test_custom_slot_models_are_registered(installed_copy):
    db = sqlite3.connect(installed_copy / "var/lib/hal0/hal0.sqlite3")
    db.execute("update slots_slot set model_name='user.MyChat' where name='chat'")
    db.execute("update slots_slot set model_name='Odd-Model' where name='embed'")
    db.commit()
    db.close()
    user_models = installed_copy / "var/lib/hal0/lemonade/user_models.json"
    user_models.write_text('{"Other": {"checkpoint": "x/y", "recipe": "llamacpp"}}')
    code, out = install("--root", installed_copy, "--only", "models",
                        "--checkpoint", "user.MyChat=org/MyChat-GGUF:Q4_K_M")
    assert code == 0, out
    assert "registered user.MyChat (org/MyChat-GGUF:Q4_K_M, llamacpp)" in out
    assert "'Odd-Model' is neither in lemond's catalogue nor registered" in out
    assert json.loads(user_models.read_text()) == {
        "Other": {"checkpoint": "x/y", "recipe": "llamacpp"},
        "MyChat": {"checkpoint": "org/MyChat-GGUF:Q4_K_M", "recipe": "llamacpp",
                   "labels": ["custom"]},
    }
    # kept: a later full run still knows the checkpoint and changes nothing
    code, out = install("--root", installed_copy, "--only", "models")
    assert "[6/10] slot models … already in place" in out


# --- hal0 step ---------------------------------------------------------------------------------------
def test_admin_password_file_names_the_operators_file(installed_copy, tmp_path):
    from django.contrib.auth.hashers import check_password

    db_path = installed_copy / "var/lib/hal0/hal0.sqlite3"
    db = sqlite3.connect(db_path)
    db.execute("delete from auth_user")  # as before the first run's admin
    db.commit()
    db.close()
    password = "correct-horse-battery-staple"
    secret = tmp_path / "admin-password"
    secret.write_text(password + "\n")
    code, out = install("--root", installed_copy, "--only", "hal0",
                        "--admin-password-file", secret)
    assert code == 0, out
    assert f"Created admin login 'admin' (password from {secret})." in out
    assert "hal0-admin-" not in out  # not the child's temporary copy
    assert password not in out
    db = sqlite3.connect(db_path)
    (encoded,) = db.execute("select password from auth_user where username='admin' "
                            "and is_superuser").fetchone()
    db.close()
    assert check_password(password, encoded)
    # an admin now exists: a later run leaves it alone and still prints no password
    code, out = install("--root", installed_copy, "--only", "hal0",
                        "--admin-password-file", secret)
    assert code == 0 and "[8/10] hal0 (database, static files, admin) … already in place" in out
    assert password not in out


def test_short_admin_password_file_exits_2(tmp_path):
    secret = tmp_path / "admin-password"
    secret.write_text("Zq7!x\n")
    root = tmp_path / "root"
    root.mkdir()
    code, out = install("--root", root, "--admin-password-file", secret)
    assert code == 2
    assert "shorter than 8 characters" in out and "Zq7!x" not in out
    assert list(root.iterdir()) == []


# --- start ----------------------------------------------------------------------------------------
@pytest.fixture
def health_server():
    """Answers /api/health (and /live) with 200: a running hal0."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _start_only(root: Path, hal0_port: int) -> tuple[int, str, Installer]:
    out = io.StringIO()
    installer = Installer(Options(root=root, only=["start"], port=hal0_port,
                                  wait_timeout=0.5), Output(out))
    installer.ctx.wait_for_services = True  # wait as a real install would
    return installer.run(), out.getvalue(), installer


def test_lemond_never_answering_is_a_loud_warning_not_a_failure(tmp_path, health_server):
    root = tmp_path / "root"
    assert install("--root", root, "--only", "config", "--set", f"port={free_port()}")[0] == 0
    code, out, installer = _start_only(root, health_server)
    assert code == 0, out
    assert "lemond did not answer" in out and "lemond unreachable" in out
    assert "hal0 is up" in out
    assert [" ".join(c) for c in installer.ctx.runner.recorded] == [
        "systemctl enable --now hal0-lemonade.service",
        "systemctl enable --now hal0-api.service"]
    assert "warning: lemond did not answer" in out  # repeated in the summary


def test_hal0_not_answering_fails_the_start_step(tmp_path):
    root = tmp_path / "root"
    code, out, _ = _start_only(root, free_port())
    assert code == 1
    assert "[9/10] start services … FAILED" in out
    assert "journalctl -u hal0-api.service" in out


def test_changes_restart_running_services(installed_copy, monkeypatch):
    monkeypatch.setattr(lemond_config, "cpu_count", lambda: 64)  # new --threads
    code, out = install("--root", installed_copy, "--only", "config,start")
    assert code == 0, out
    assert recorded(installed_copy)[-1] == "systemctl restart hal0-lemonade.service"


def test_preflight_reports_low_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20))
    root = tmp_path / "root"
    code, out = install("--root", root)
    assert code == 1
    assert "GiB free for lemond at /opt/lemonade" in out
    assert "GiB free for hal0's state at /var/lib/hal0" in out


@pytest.fixture
def good_host(monkeypatch, tmp_path):
    """A host that passes preflight without --root: root, systemd, x86_64, disk space.
    Each test then breaks one thing. Preflight only reads the real paths."""
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(500 * 2**30, 0, 400 * 2**30))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (tmp_path / "run-systemd-system").mkdir()
    monkeypatch.setattr(steps, "SYSTEMD_RUNTIME_DIR", tmp_path / "run-systemd-system")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name, *a, **k: "/usr/bin/systemctl" if name == "systemctl"
                        else real_which(name, *a, **k))
    monkeypatch.setattr(steps.platform, "machine", lambda: "x86_64")
    return monkeypatch


def _preflight(**options) -> tuple[str | None, Installer]:
    """Run step 1 alone on the real system (no --root): the failure message, or None."""
    installer = Installer(Options(only=["preflight"], **options), Output(io.StringIO()))
    installer.validate()
    try:
        installer.step_preflight()
    except StepFailed as exc:
        return str(exc), installer
    return None, installer


NOT_ROOT = "- not running as root: use `sudo .venv/bin/python manage.py install`"
NO_SYSTEMD = "systemd is not running here (no "
NO_SYSTEMCTL = "- systemctl is not on PATH"
ARM = "- this is a aarch64 machine; the lemond release hal0 installs is built for x86_64"


def test_preflight_passes_on_a_good_host(good_host):
    assert _preflight()[0] is None


def test_preflight_refuses_a_non_root_user(good_host):
    good_host.setattr(os, "geteuid", lambda: 1000)
    message, _ = _preflight()
    assert message.splitlines()[0].startswith(NOT_ROOT)
    assert len(message.splitlines()) == 1  # one problem, one line
    assert _preflight(dry_run=True)[0] is None  # a preview needs no root


def test_preflight_refuses_a_host_without_systemd(good_host, tmp_path):
    good_host.setattr(steps, "SYSTEMD_RUNTIME_DIR", tmp_path / "absent")
    message, _ = _preflight()
    assert message == (f"- systemd is not running here (no {tmp_path / 'absent'}): hal0 "
                       "installs lemond and itself as systemd services")


def test_preflight_refuses_a_host_without_systemctl(good_host):
    good_host.setattr(shutil, "which", lambda name, *a, **k: None)
    message, _ = _preflight()
    assert message.startswith(NO_SYSTEMCTL) and len(message.splitlines()) == 1


def test_preflight_refuses_another_architecture(good_host):
    good_host.setattr(steps.platform, "machine", lambda: "aarch64")
    message, _ = _preflight()
    assert message == ARM + ": pass --tarball with a build for this machine"
    # with the operator's own build it is only a warning
    message, installer = _preflight(tarball="/srv/lemonade-arm64.tar.gz")
    assert message is None
    assert ARM[2:] + " (using your --tarball)" in installer.ctx.warnings


def test_preflight_lists_every_failure_on_its_own_line(good_host, tmp_path):
    good_host.setattr(os, "geteuid", lambda: 1000)
    good_host.setattr(steps, "SYSTEMD_RUNTIME_DIR", tmp_path / "absent")
    good_host.setattr(steps.platform, "machine", lambda: "aarch64")
    lines = _preflight()[0].splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(NOT_ROOT)
    assert lines[1].startswith("- " + NO_SYSTEMD)
    assert lines[2].startswith(ARM)


def test_preflight_failure_stops_a_real_run_and_fails_a_dry_run(good_host, tmp_path):
    good_host.setattr(steps, "SYSTEMD_RUNTIME_DIR", tmp_path / "absent")
    out = io.StringIO()
    assert Installer(Options(only=["preflight"]), Output(out)).run() == 1
    assert "[1/10] preflight checks … FAILED" in out.getvalue()
    assert "[10/10]" not in out.getvalue()  # nothing after it ran
    out = io.StringIO()
    assert Installer(Options(only=["preflight"], dry_run=True), Output(out)).run() == 1
    text = out.getvalue()
    assert "WARNING: a real install would stop here: " + NO_SYSTEMD in text
    assert "[1/10] preflight checks … would fail" in text
    assert "a real install would stop at step 1 (preflight)" in text


def test_step_failure_is_typed():
    with pytest.raises(StepFailed) as exc:
        download.check_members([tarfile.TarInfo("/abs")])
    assert "absolute path" in str(exc.value) and exc.value.hint
