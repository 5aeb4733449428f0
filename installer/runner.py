"""The one object every external command of the installer goes through.

* real install: runs the command (no shell) and fails loudly on a non-zero exit;
* `--dry-run`: prints what it would run and runs nothing that changes the system
  (read-only queries such as `getent` or `systemctl is-active` still run);
* `--root DIR`: records the system commands (`useradd`, `usermod`, `chown`, `systemctl` …)
  instead of running them, appends them to `DIR/.hal0-install/recorded-commands.log`, and
  simulates their effect on the files under DIR that the real command would touch
  (`etc/passwd`, `etc/group`, the `multi-user.target.wants` links) so a second run sees a
  finished install, exactly as it would on a real box. Queries are answered from DIR.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import httpx

from installer.layout import RECORD_LOG, WANTS_DIR


class CommandFailed(Exception):
    def __init__(self, cmd: list[str], returncode: int, output: str):
        self.cmd, self.returncode, self.output = cmd, returncode, output.strip()
        detail = f": {self.output.splitlines()[-1]}" if self.output else ""
        super().__init__(f"`{shlex.join(cmd)}` exited with {returncode}{detail}")


class Runner:
    def __init__(self, root: Path | None, dry_run: bool, out):
        self.root = root
        self.dry_run = dry_run
        self.out = out
        self.recorded: list[list[str]] = []  # what --root recorded (and --dry-run printed)

    # --- commands that change the system -------------------------------------------
    def run(self, cmd: list[str], *, system: bool = True, env: dict | None = None,
            cwd: str | Path | None = None) -> str:
        """Run a command that changes something. Returns its output (empty when it was
        only recorded or printed). `system=False` marks hal0's own commands, which run
        for real under --root too (they only touch files under DIR)."""
        shown = shlex.join(cmd)
        if self.dry_run:
            self.recorded.append(cmd)
            self.out.line(f"       would run: {shown}")
            return ""
        if self.root is not None and system:
            self.recorded.append(cmd)
            self.out.line(f"       recorded: {shown}")
            self._log(shown)
            self._simulate(cmd)
            return ""
        self.out.line(f"       $ {shown}")
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise CommandFailed(cmd, proc.returncode, proc.stderr or proc.stdout)
        return proc.stdout

    def spawn(self, cmd: list[str], *, env: dict, cwd: str | Path, stderr) -> subprocess.Popen:
        """Start a long-lived helper (the hal0 session) talking over pipes. It only
        touches hal0's own database and files, so it runs under --root as well."""
        if self.root is None and not self.dry_run:
            self.out.line(f"       $ {shlex.join(cmd)}")
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)

    # --- read-only questions ------------------------------------------------------------
    def query(self, cmd: list[str]) -> tuple[int, str]:
        """Ask the system something (never printed, never recorded): (exit code, stdout)."""
        if self.root is not None:
            return self._answer(cmd)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return 127, ""
        return proc.returncode, proc.stdout

    def getent(self, database: str, key: str) -> list[str] | None:
        """`getent passwd|group KEY` split into fields, or None when there is no entry."""
        rc, out = self.query(["getent", database, key])
        if rc != 0 or not out.strip():
            return None
        return out.strip().splitlines()[0].split(":")

    def unit_enabled(self, unit: str) -> bool:
        return self.query(["systemctl", "is-enabled", "--quiet", unit])[0] == 0

    def unit_active(self, unit: str) -> bool:
        return self.query(["systemctl", "is-active", "--quiet", unit])[0] == 0

    def wait_http(self, url: str, timeout: float, ok=lambda r: r.status_code == 200):
        """Poll `url` until `ok(response)` or `timeout` seconds pass.
        Returns (True, response) or (False, last error text)."""
        if self.dry_run:
            self.out.line(f"       would wait up to {timeout:g} s for {url}")
            return True, None
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                try:
                    response = client.get(url)
                    if ok(response):
                        return True, response
                    last = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last = str(exc) or type(exc).__name__
                if time.monotonic() >= deadline:
                    return False, last
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # --- --root: record and simulate ----------------------------------------------------
    def _p(self, system_path: str) -> Path:
        return self.root / system_path.lstrip("/")

    def _log(self, line: str) -> None:
        path = self._p(RECORD_LOG)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def _read_db(self, name: str) -> list[list[str]]:
        path = self._p(f"/etc/{name}")
        if not path.exists():
            return []
        return [ln.split(":") for ln in path.read_text().splitlines() if ln and ":" in ln]

    def _write_db(self, name: str, rows: list[list[str]]) -> None:
        path = self._p(f"/etc/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(":".join(r) + "\n" for r in rows))

    def _answer(self, cmd: list[str]) -> tuple[int, str]:
        if cmd[:1] == ["getent"] and len(cmd) == 3 and cmd[1] in ("passwd", "group"):
            for row in self._read_db(cmd[1]):
                if row[0] == cmd[2]:
                    return 0, ":".join(row) + "\n"
            return 2, ""
        if cmd[:1] == ["systemctl"] and cmd[1] in ("is-enabled", "is-active"):
            # Nothing runs under --root: a unit counts as enabled and active once an
            # `enable --now` was recorded (its wants link exists).
            unit = cmd[-1]
            return (0, "") if (self._p(WANTS_DIR) / unit).is_symlink() else (1, "")
        return 0, ""

    def _simulate(self, cmd: list[str]) -> None:
        prog, args = os.path.basename(cmd[0]), cmd[1:]
        if prog == "useradd":
            self._sim_useradd(args)
        elif prog == "usermod":
            self._sim_usermod(args)
        elif prog == "groupadd":
            name = args[-1]
            groups = self._read_db("group")
            if not any(g[0] == name for g in groups):
                groups.append([name, "x", str(self._free_id(groups, 2)), ""])
                self._write_db("group", groups)
        elif prog == "systemctl" and args[:1] == ["enable"]:
            wants = self._p(WANTS_DIR)
            wants.mkdir(parents=True, exist_ok=True)
            for unit in (a for a in args[1:] if not a.startswith("-")):
                link = wants / unit
                if not link.is_symlink():
                    link.symlink_to(f"../{unit}")

    @staticmethod
    def _free_id(rows: list[list[str]], column: int) -> int:
        used = {int(r[column]) for r in rows if len(r) > column and r[column].isdigit()}
        candidate = 999
        while candidate in used:
            candidate -= 1
        return candidate

    @staticmethod
    def _opts(args: list[str], with_value: dict[str, str]) -> tuple[dict[str, str], list[str]]:
        found, rest, i = {}, [], 0
        while i < len(args):
            a = args[i]
            if a in with_value:
                found[with_value[a]] = args[i + 1]
                i += 2
                continue
            if a == "-aG":
                found["groups"] = args[i + 1]
                i += 2
                continue
            if not a.startswith("-"):
                rest.append(a)
            i += 1
        return found, rest

    def _sim_useradd(self, args: list[str]) -> None:
        opts, rest = self._opts(args, {"--home-dir": "home", "-d": "home", "--shell": "shell",
                                       "-s": "shell", "--gid": "gid", "-g": "gid",
                                       "--groups": "groups", "-G": "groups"})
        name = rest[-1]
        users, groups = self._read_db("passwd"), self._read_db("group")
        uid = self._free_id(users, 2)
        if "gid" in opts:
            gid = next(g[2] for g in groups if opts["gid"] in (g[0], g[2]))
        else:  # --user-group
            gid = str(self._free_id(groups, 2))
            groups.append([name, "x", gid, ""])
        users.append([name, "x", str(uid), gid, "", opts.get("home", f"/home/{name}"),
                      opts.get("shell", "/bin/sh")])
        self._write_db("passwd", users)
        self._write_db("group", groups)

    def _sim_usermod(self, args: list[str]) -> None:
        opts, rest = self._opts(args, {"--home": "home", "-d": "home", "--shell": "shell",
                                       "-s": "shell", "--gid": "gid", "-g": "gid",
                                       "--groups": "groups", "-G": "groups"})
        name = rest[-1]
        users, groups = self._read_db("passwd"), self._read_db("group")
        for row in users:
            if row[0] == name:
                if "home" in opts:
                    row[5] = opts["home"]
                if "shell" in opts:
                    row[6] = opts["shell"]
                if "gid" in opts:
                    row[3] = next(g[2] for g in groups if opts["gid"] in (g[0], g[2]))
        for group in opts.get("groups", "").split(","):
            for row in groups:
                if row[0] == group:
                    members = [m for m in row[3].split(",") if m]
                    if name not in members:
                        row[3] = ",".join([*members, name])
        self._write_db("passwd", users)
        self._write_db("group", groups)
