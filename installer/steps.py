"""The ten install steps, in the order the original shell installer proved, and the
`Installer` that validates the flags, runs the selected steps and prints the summary.

Each step checks before it acts and reports one of: done, changed, already in place,
skipped (or "would change" / "would fail" in a dry run). A failing step raises
`StepFailed` with a recovery hint; nothing it wrote is left half-done (atomic writes,
temporary trees removed). See docs/installer.md for the operator's view.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from django.conf import settings

from installer import download, lemond_config, units, usermodels
from installer.context import Context, Options, Output
from installer.errors import StepFailed, UsageError
from installer.files import chown, ensure_dir, write_file
from installer.layout import (
    API_UNIT,
    CONFIG_FILE,
    ENV_DIR,
    ENV_FILE,
    EXTRA_GROUPS,
    GROUP,
    LEMONADE_DIR,
    LEMONADE_STATE,
    LEMONADE_UNIT,
    LEMOND_BIN,
    LEMOND_SHA256,
    LEMOND_URL,
    LEMOND_VERSION,
    MARKER,
    MODELS_DIR,
    OVERRIDES_FILE,
    PLACEHOLDER_SHA256,
    RECORD_LOG,
    STATE_DIR,
    UNIT_DIR,
    USER,
    USER_MODELS_FILE,
)
from installer.runner import CommandFailed
from providers.lemonade import catalog
from slots.seed import DEFAULT_SLOTS

DONE, CHANGED, IN_PLACE, SKIPPED, WOULD, WOULD_FAIL = (
    "done", "changed", "already in place", "skipped", "would change", "would fail")

GIB = 1024 ** 3
MIN_FREE = 1 * GIB  # lemond and hal0 themselves
MODELS_FREE = 20 * GIB  # below this, model downloads will soon fail: warn
# systemd creates this directory at boot when it is PID 1: the check `sd_booted()` makes.
# A module constant (looked up at call time) so tests can point it elsewhere.
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")

# name, title, recovery hint (what to check when the step fails)
STEPS = [
    ("preflight", "preflight checks",
     "fix what is listed above and re-run"),
    ("user", f"system user {USER}",
     f"check `getent passwd {USER}` and `getent group {GROUP}`; useradd/usermod must work"),
    ("dirs", "directories",
     f"check the filesystem under {LEMONADE_DIR} and {STATE_DIR} (space, read-only mounts)"),
    ("lemond", "lemond",
     "check the network or pass --tarball with a local copy of the release tarball "
     "(and --sha256 for a version other than the pinned one)"),
    ("config", "lemond config",
     f"check {CONFIG_FILE} and the persisted overrides in {OVERRIDES_FILE}"),
    ("models", "slot models",
     f"check {USER_MODELS_FILE} is valid JSON"),
    ("units", "systemd units",
     f"check {UNIT_DIR} and {ENV_FILE}; `systemctl daemon-reload` must work"),
    ("hal0", "hal0 (database, static files, admin)",
     f"check {ENV_FILE} (DATABASE_URL, HAL0_SECRET_KEY) and that the {USER} user can read "
     "the project directory and its virtualenv"),
    ("start", "start services",
     f"check `systemctl status {LEMONADE_UNIT} {API_UNIT}` and "
     f"`journalctl -u {API_UNIT} -n 50 --no-pager`"),
    ("summary", "summary", ""),
]
STEP_NAMES = [name for name, _, _ in STEPS]
TOTAL = len(STEPS)
ALWAYS = {"preflight", "summary"}


# --- helpers ------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise StepFailed(f"{path} is not valid JSON ({exc})",
                         f"fix or move {path} aside, then re-run") from None
    if not isinstance(data, dict):
        raise StepFailed(f"{path} should hold a JSON object ({what})",
                         f"fix or move {path} aside, then re-run")
    return data


def _mismatch(where, expected: str, actual: str) -> str:
    return f"sha256 mismatch for {where}:\n  expected {expected}\n  actual   {actual}"


def _archive_version(top: str) -> str | None:
    """The version in a release tarball's top folder (lemonade-embeddable-VER-OS-ARCH)."""
    match = re.fullmatch(r"lemonade-embeddable-([0-9][0-9A-Za-z.+]*)-[a-z]+-[0-9a-z_]+", top)
    return match and match.group(1)


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _systemd_problem() -> str | None:
    """Why hal0's units could not run here (None when systemd is running)."""
    if not SYSTEMD_RUNTIME_DIR.is_dir():
        return (f"systemd is not running here (no {SYSTEMD_RUNTIME_DIR}): hal0 installs "
                "lemond and itself as systemd services")
    if shutil.which("systemctl") is None:
        return ("systemctl is not on PATH: hal0 installs lemond and itself as systemd "
                "services and starts them with systemctl")
    return None


def _service_access_problems() -> list[str]:
    """What the services will miss on the real system: curl for lemond's ExecStop, and a
    project directory and Python the hal0 user can read and run."""
    problems = []
    if not Path("/usr/bin/curl").exists():
        problems.append(f"/usr/bin/curl is missing: {LEMONADE_UNIT}'s ExecStop uses "
                        "it (systemd then falls back to SIGTERM); install curl")
    python = Path(os.path.realpath(sys.executable))
    if not _others_can_use(Path(settings.BASE_DIR) / "manage.py"):
        problems.append(f"the {USER} user may not be able to read "
                        f"{settings.BASE_DIR}: {API_UNIT} runs hal0 from there as "
                        f"{USER} (put the project under /opt, world-readable)")
    elif not _others_can_use(python, execute=True):
        problems.append(f"the {USER} user may not be able to run {python} "
                        f"(the Python behind {sys.executable}); use a Python "
                        "outside /root for the virtualenv")
    return problems


def _others_can_use(path: Path, execute: bool = False) -> bool:
    """Can an unprivileged user (hal0) reach `path` and read (or execute) it?"""
    for part in [*reversed(path.parents), path]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if part.is_dir():
            need = stat.S_IXOTH
        else:
            need = stat.S_IXOTH if execute else stat.S_IROTH
        if not mode & need:
            return False
    return True


# --- the installer ---------------------------------------------------------------------------
class Installer:
    def __init__(self, options: Options, out: Output | None = None, runner=None):
        self.options = options
        self.out = out or Output()
        self.ctx = Context(options, self.out, runner)
        self.results: dict[str, str] = {}
        self.selected: list[str] = STEP_NAMES
        self.sets: dict[str, object] = {}
        self.unsets: list[str] = []
        self.checkpoints: dict[str, str] = {}
        self.admin_password: str | None = None
        self.admin_message = ""

    # -- flags ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every flag before anything changes (UsageError → exit code 2)."""
        o = self.options
        if o.only:
            self.selected = self._selected_steps(o.only)
        self._check_lemond_flags()
        self._check_target_flags()
        if o.set or o.unset:
            self._parse_config_flags()
        self._parse_checkpoints()
        if o.admin_password_file is not None:
            self.admin_password = self._read_admin_password(o.admin_password_file)

    @staticmethod
    def _selected_steps(only: list[str]) -> list[str]:
        """The steps `--only` names (by name or number), plus the ones that always run."""
        wanted = set()
        for item in only:
            for name in filter(None, (s.strip() for s in item.split(","))):
                if name.isdigit() and 1 <= int(name) <= TOTAL:
                    name = STEP_NAMES[int(name) - 1]
                if name not in STEP_NAMES:
                    raise UsageError(f"--only {name}: unknown step; the steps are "
                                     + ", ".join(STEP_NAMES))
                wanted.add(name)
        return [n for n in STEP_NAMES if n in wanted or n in ALWAYS]

    def _check_lemond_flags(self) -> None:
        """--sha256 (normalised to lower case) and --lemond-version."""
        o = self.options
        if o.sha256 is not None:
            sha = o.sha256.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise UsageError(f"--sha256 {o.sha256!r}: expected 64 hexadecimal digits")
            o.sha256 = sha
        version = o.lemond_version
        if version is not None and not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+-]*", version):
            raise UsageError(f"--lemond-version {o.lemond_version!r} is not a version")
        if version not in (None, LEMOND_VERSION) and o.sha256 is None:
            raise UsageError(f"--lemond-version {o.lemond_version} needs --sha256 "
                             f"(only {LEMOND_VERSION}'s hash is built in)")

    def _check_target_flags(self) -> None:
        """--port, --wait-timeout and --root."""
        o = self.options
        if not 1 <= o.port <= 65535:
            raise UsageError(f"--port {o.port}: not a TCP port")
        if o.wait_timeout < 0:
            raise UsageError("--wait-timeout must not be negative")
        if o.root is not None and Path(o.root).exists() and not Path(o.root).is_dir():
            raise UsageError(f"--root {o.root}: not a directory")

    def _parse_config_flags(self) -> None:
        """--set/--unset, checked against lemond's defaults (applied by the config step)."""
        o = self.options
        if "config" not in self.selected:
            raise UsageError("--set/--unset are applied by the config step; "
                             "add `--only config` (or drop --only)")
        defaults = lemond_config.load_defaults()
        for item in o.set:
            key, value = lemond_config.parse_set(item, defaults)
            self.sets[key] = value
        self.unsets = [lemond_config.check_unset(k.strip(), defaults) for k in o.unset]

    def _parse_checkpoints(self) -> None:
        """--checkpoint MODEL=org/repo[:VARIANT] (applied by the models step)."""
        for item in self.options.checkpoint:
            name, sep, checkpoint = item.partition("=")
            if not sep or not name.strip() or not checkpoint.strip():
                raise UsageError(f"--checkpoint {item!r}: expected MODEL=org/repo[:VARIANT]")
            self.checkpoints[name.strip()] = checkpoint.strip()
        if self.checkpoints and "models" not in self.selected:
            raise UsageError("--checkpoint is applied by the models step; "
                             "add `--only models` (or drop --only)")

    @staticmethod
    def _read_admin_password(path: Path | str) -> str:
        try:
            password = Path(path).read_text().strip()
        except OSError as exc:
            raise UsageError(f"--admin-password-file {path}: {exc.strerror}") from None
        if len(password) < 8:
            raise UsageError(f"--admin-password-file {path}: the "
                             "password is shorter than 8 characters")
        return password

    # -- running ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run the selected steps. 0 = success, 1 = a step failed (UsageError propagates)."""
        self.validate()
        ctx = self.ctx
        if ctx.dry_run:
            self.out.line("Dry run: every command and file change is printed; nothing is "
                          "changed.")
        if ctx.root is not None:
            self.out.line(f"Installing under {ctx.root}: system commands are recorded in "
                          f"{ctx.path(RECORD_LOG)} instead of being run.")
        try:
            for number, (name, title, hint) in enumerate(STEPS, start=1):
                if name == "lemond":
                    title = f"lemond v{self._version()}"
                label = f"[{number}/{TOTAL}] {title}"
                if name not in self.selected:
                    self.results[name] = SKIPPED
                    self.out.line(f"{label} … {SKIPPED} (--only)")
                    continue
                self.out.pending = label
                try:
                    status = getattr(self, f"step_{name}")()
                except (StepFailed, CommandFailed, OSError) as exc:
                    self.out.pending = None
                    self.out.error(f"{label} … FAILED")
                    for line in str(exc).splitlines():
                        self.out.error(f"       {line}")
                    step_hint = getattr(exc, "hint", "") or hint
                    self.out.line(f"       what to check: {step_hint}")
                    if name not in ALWAYS:
                        self.out.line(f"       re-run just this step: python manage.py "
                                      f"install --only {name}"
                                      + (f" --root {ctx.root}" if ctx.root else ""))
                    self.results[name] = "FAILED"
                    return 1
                self.out.pending = None
                self.results[name] = status
                if name != "summary":
                    self.out.line(f"{label} … {status}")
        except KeyboardInterrupt:
            self.out.pending = None
            self.out.error("Interrupted: the step in progress was rolled back "
                           "(partial downloads and temporary trees removed).")
            return 130
        finally:
            ctx.close()
        return 1 if self.would_stop else 0

    @property
    def would_stop(self) -> bool:
        """A dry run found that a real install would stop in preflight (it exits 1)."""
        return self.results.get("preflight") == WOULD_FAIL

    def _status(self, changed: bool) -> str:
        if not changed:
            return IN_PLACE
        return WOULD if self.ctx.dry_run else CHANGED

    def _installed_lemond(self) -> tuple[str, str | None] | None:
        """(version, recorded sha256 or None) of the lemond in /opt/lemonade; None when
        there is no executable lemond or no readable marker."""
        ctx = self.ctx
        binary = ctx.path(LEMOND_BIN)
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            return None
        try:
            words = ctx.path(MARKER).read_text().split()
        except OSError:
            return None
        if not words:
            return None
        # Our marker is "VERSION\nsha256 HEX"; the shell installer's holds the version only.
        recorded = words[2] if len(words) >= 3 and words[1] == "sha256" else None
        return words[0], recorded

    def _expected_sha(self) -> str:
        """The hash the archive must have: --sha256, else the pinned release's (a bare
        --tarball is checked against that too)."""
        return self.options.sha256 or LEMOND_SHA256

    def _names_archive(self) -> bool:
        """Does this run name an archive (--tarball or --sha256)? The placeholder hash
        names none."""
        o = self.options
        return bool(o.tarball or o.sha256) and self._expected_sha() != PLACEHOLDER_SHA256

    def _needs_lemond(self) -> bool:
        """Install lemond when there is none, when this run names another version, or when
        it names another archive than the installed one came from (issue #5). A plain run
        keeps what is installed, whatever its version."""
        installed = self._installed_lemond()
        if installed is None:
            return True
        version, recorded = installed
        wanted = self.options.lemond_version
        if wanted is not None and wanted != version:
            return True
        return (recorded is not None and self._names_archive()
                and recorded != self._expected_sha())

    def _version(self) -> str:
        """The lemond version this run installs or keeps: the one named, else the installed
        one when it is kept, else the pinned release."""
        if self.options.lemond_version:
            return self.options.lemond_version
        installed = self._installed_lemond()
        if installed is not None and not self._needs_lemond():
            return installed[0]
        return LEMOND_VERSION

    @functools.cached_property
    def _local_tarball(self) -> tuple[Path, str] | None:
        """(path, sha256) of a local --tarball, read once per run (reading changes nothing,
        so dry runs check it too); None for a URL. StepFailed when it cannot be read."""
        local = download.local_path(self._source())
        return None if local is None else (local, download.sha256_of(local))

    @functools.cached_property
    def _tarball_problem(self) -> str | None:
        """Why a real install would stop on the local --tarball (None when it would not);
        worked out once per run."""
        try:
            local = self._local_tarball
        except StepFailed as exc:
            return str(exc)
        expected = self._expected_sha()
        if local is None:
            return None
        if expected != PLACEHOLDER_SHA256 and local[1] != expected:
            return (_mismatch(local[0], expected, local[1])
                    + "\n  nothing was changed: the tarball is damaged or --sha256 is wrong "
                    "for it")
        # The archive checks step 4 runs before unpacking, run here too, so a dry run
        # fails exactly when the real run would (and the real run before any change).
        try:
            self._release_version(download.inspect(local[0]))
        except StepFailed as exc:
            return str(exc)
        return None

    def _release_version(self, top: str) -> str:
        """The version a release tarball with top folder `top` holds; StepFailed when it
        is not the --lemond-version asked for."""
        version = _archive_version(top) or self._version()
        wanted = self.options.lemond_version
        if wanted and version != wanted:
            raise StepFailed(f"the tarball holds lemond {version} ({top}), not "
                             f"--lemond-version {wanted}",
                             f"nothing under {LEMONADE_DIR} was changed; pass the "
                             "tarball of that version, or the version it holds")
        return version

    def _source(self) -> str:
        return self.options.tarball or LEMOND_URL.format(ver=self._version())

    def _overrides(self) -> dict:
        state = _read_json(self.ctx.path(OVERRIDES_FILE), "installer overrides")
        state.setdefault("config", {})
        state.setdefault("checkpoints", {})
        return state

    def _config(self, state: dict | None = None) -> tuple[dict, list[str]]:
        state = state if state is not None else self._overrides()
        overrides = {**state["config"]}
        overrides.update(self.sets)
        for key in self.unsets:
            overrides.pop(key, None)
        return lemond_config.build(overrides, lemond_config.cpu_count())

    # -- 1 ----------------------------------------------------------------------------------
    def step_preflight(self) -> str:
        failures: list[str] = []
        warnings: list[str] = []
        self._check_host(failures, warnings)
        self._check_disk_space(failures, warnings)
        if self.ctx.root is None:
            warnings += _service_access_problems()
        # A local tarball can be checked before anything changes (in a dry run too:
        # reading it changes nothing). A URL is only fetched by a real install's step 4.
        if "lemond" in self.selected and self._needs_lemond():
            problem = self._tarball_problem
            if problem:
                failures.append(problem)
        return self._preflight_status(failures, warnings)

    def _check_host(self, failures: list[str], warnings: list[str]) -> None:
        """Root, systemd, and a machine the pinned lemond release runs on."""
        ctx, o = self.ctx, self.options
        if ctx.root is None and not ctx.dry_run and os.geteuid() != 0:
            failures.append("not running as root: use `sudo .venv/bin/python manage.py "
                            "install` (or --dry-run to preview, --root DIR to install into "
                            "a directory)")
        systemd = _systemd_problem() if ctx.root is None else None
        if systemd:
            failures.append(systemd)
        machine = platform.machine().lower()
        if machine not in ("x86_64", "amd64"):
            message = (f"this is a {platform.machine()} machine; the lemond release hal0 "
                       "installs is built for x86_64")
            (warnings if o.tarball else failures).append(
                message + (" (using your --tarball)" if o.tarball else
                           ": pass --tarball with a build for this machine"))

    def _check_disk_space(self, failures: list[str], warnings: list[str]) -> None:
        ctx = self.ctx
        for system_path, what in ((LEMONADE_DIR, "lemond"), (STATE_DIR, "hal0's state")):
            free = _free_bytes(ctx.path(system_path))
            if free < MIN_FREE:
                failures.append(f"only {free / GIB:.1f} GiB free for {what} at "
                                f"{system_path}; at least {MIN_FREE // GIB} GiB is needed")
        free = _free_bytes(ctx.path(MODELS_DIR))
        if MIN_FREE <= free < MODELS_FREE:
            warnings.append(f"{free / GIB:.0f} GiB free for models at {MODELS_DIR}; "
                            "models take several GiB each")

    def _preflight_status(self, failures: list[str], warnings: list[str]) -> str:
        ctx = self.ctx
        for text in warnings:
            ctx.warn(text)
        if failures:
            if ctx.dry_run:
                # Go on showing the plan, but exit non-zero: the real install would not.
                for text in failures:
                    ctx.warn(f"a real install would stop here: {text}")
                return WOULD_FAIL
            raise StepFailed("\n".join(f"- {f}" for f in failures),
                             "fix what is listed above and re-run")
        return DONE

    # -- 2 ----------------------------------------------------------------------------------
    def step_user(self) -> str:
        ctx, run = self.ctx, self.ctx.runner.run
        getent = ctx.runner.getent
        nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin")
                        if ctx.root is not None or Path(p).exists()), "/bin/false")
        changed = False
        user, group = getent("passwd", USER), getent("group", GROUP)
        if user is None:
            run(["useradd", "--system", "--home-dir", STATE_DIR, "--no-create-home",
                 "--shell", nologin, *(["--gid", GROUP] if group else ["--user-group"]),
                 USER])
            changed = True
        else:
            mods = []
            if group is None:
                run(["groupadd", "--system", GROUP])
                mods += ["--gid", GROUP]
            elif user[3] != group[2]:
                mods += ["--gid", GROUP]
            if user[5] != STATE_DIR:
                mods += ["--home", STATE_DIR]
            if not user[6].endswith(("nologin", "false")):
                mods += ["--shell", nologin]
            if mods:
                run(["usermod", *mods, USER])
                changed = True
        missing, absent = [], []
        for name in EXTRA_GROUPS:
            entry = getent("group", name)
            if entry is None:
                absent.append(name)
            elif USER not in entry[3].split(","):
                missing.append(name)
        if missing:
            run(["usermod", "--append", "--groups", ",".join(missing), USER])
            changed = True
        if absent and changed:
            ctx.note(f"no {' or '.join(absent)} group on this system: lemond gets GPU "
                     "access only through the groups that exist")
        return self._status(changed)

    # -- 3 ----------------------------------------------------------------------------------
    def step_dirs(self) -> str:
        ctx = self.ctx
        changed = False
        for system_path, mode in ((STATE_DIR, 0o750), (LEMONADE_DIR, 0o755),
                                  (LEMONADE_STATE, 0o755), (MODELS_DIR, 0o755)):
            changed |= ensure_dir(ctx, ctx.path(system_path), mode=mode, owner=USER)
        return self._status(changed)

    # -- 4 ----------------------------------------------------------------------------------
    def step_lemond(self) -> str:
        ctx = self.ctx
        target = ctx.path(LEMONADE_DIR)
        if not self._needs_lemond():
            self._note_kept_lemond()
            return IN_PLACE
        source, expected = self._source(), self._expected_sha()
        skip_sha = os.environ.get("HAL0_SKIP_LEMONADE_SHA") == "1"
        if expected == PLACEHOLDER_SHA256 and not skip_sha:
            raise StepFailed("the expected sha256 is the all-zero placeholder",
                             "pass --sha256 with the tarball's real hash (or set "
                             "HAL0_SKIP_LEMONADE_SHA=1 to install it unchecked, unsafe)")
        if ctx.dry_run:
            ctx.note(f"would fetch {source}")
            if self._tarball_problem:
                ctx.note("a real install stops in preflight: see the warning there")
                return WOULD_FAIL
            digest = self._local_tarball and self._local_tarball[1]
            if digest is None:
                ctx.note(f"would check sha256 {expected}")
            elif expected == PLACEHOLDER_SHA256:
                ctx.note(f"would NOT check sha256 (placeholder hash); the tarball's sha256 "
                         f"is {digest}")
            else:
                ctx.note(f"sha256 ok ({digest})")
            ctx.note(f"would unpack it into {target} (top folder stripped, swapped in "
                     f"atomically), write {MARKER} and run chown -R {USER}:{GROUP} {target}")
            return WOULD
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{target.name}-*"):  # left by a crashed earlier run
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        ctx.note(f"fetching {source}")
        tarball, digest = download.fetch(source, parent, ctx.out)
        try:
            if expected == PLACEHOLDER_SHA256:
                ctx.warn(f"sha256 NOT checked (placeholder hash, HAL0_SKIP_LEMONADE_SHA=1); "
                         f"the tarball's sha256 is {digest}")
            elif digest != expected:
                raise StepFailed(
                    _mismatch(source, expected, digest),
                    f"nothing under {LEMONADE_DIR} was changed; the download is damaged or "
                    "--sha256 is wrong for this tarball")
            else:
                ctx.note(f"sha256 ok ({digest})")
            staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}-new-"))
            try:
                version = self._release_version(download.extract(tarball, staging))
                lemond = staging / "lemond"
                if not (lemond.is_file() and os.access(lemond, os.X_OK)):
                    raise StepFailed("the tarball has no executable `lemond` at its top",
                                     "is this a lemonade-embeddable release tarball?")
                download.write_new(staging / Path(MARKER).name,
                                   f"{version}\nsha256 {digest}\n")
                os.chmod(staging, 0o755)
                count = sum(1 for _ in staging.rglob("*"))
                download.swap_in(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            tarball.unlink(missing_ok=True)
        ctx.note(f"installed lemond {version} into {target} ({count} entries)")
        chown(ctx, target, recursive=True)
        ctx.changed.add("lemond")
        return CHANGED

    def _note_kept_lemond(self) -> None:
        """Say which archive the kept lemond came from when it is not the expected one."""
        version, recorded = self._installed_lemond()
        if recorded is not None and recorded != self._expected_sha():
            self.ctx.note(f"lemond v{version} already installed (from a tarball with sha256 "
                          f"{recorded}); kept: name another --lemond-version, or a --tarball "
                          "or --sha256 for another archive, to replace it")

    # -- 5 ----------------------------------------------------------------------------------
    def step_config(self) -> str:
        ctx = self.ctx
        state = self._overrides()
        config, warnings = self._config(state)
        for text in warnings:
            ctx.warn(text)
        changed = False
        if self.sets or self.unsets:
            new = {**state["config"], **self.sets}
            for key in self.unsets:
                if key not in new:
                    ctx.note(f"--unset {key}: there was no override to remove")
                new.pop(key, None)
            if new != state["config"]:
                state["config"] = new
                changed |= write_file(ctx, ctx.path(OVERRIDES_FILE),
                                      json.dumps(state, indent=2) + "\n", mode=0o644)
                for key, value in new.items():
                    ctx.note(f"override kept for later runs: {key} = {json.dumps(value)}")
        if write_file(ctx, ctx.path(CONFIG_FILE), lemond_config.render(config), mode=0o644,
                      owner=USER):
            changed = True
            ctx.changed.add("config")
            ctx.note(f"llamacpp.args = {config['llamacpp']['args']!r} "
                     f"(nproc {lemond_config.cpu_count() or 'unknown'})")
        return self._status(changed)

    # -- 6 ----------------------------------------------------------------------------------
    def step_models(self) -> str:
        ctx = self.ctx
        changed = False
        state = self._overrides()
        checkpoints = {**state["checkpoints"], **self.checkpoints}
        if checkpoints != state["checkpoints"]:
            state["checkpoints"] = checkpoints
            changed |= write_file(ctx, ctx.path(OVERRIDES_FILE),
                                  json.dumps(state, indent=2) + "\n", mode=0o644)
        session = ctx.hal0()
        reason = session.unavailable()
        slots = DEFAULT_SLOTS
        if reason is None:
            reply = session.request("slots")
            if reply["db"] == "ok":
                slots = reply["slots"]
            else:
                reason = "hal0's database is not set up yet"
        if reason:
            ctx.note(f"{reason}: checking the default slots")
        path = ctx.path(USER_MODELS_FILE)
        existing = _read_json(path, "lemond user models")
        plan = usermodels.plan(slots, catalog.load_catalog(), existing, checkpoints)
        if plan.add:
            merged = {**existing, **plan.add}
            if write_file(ctx, path, json.dumps(merged, indent=2) + "\n", mode=0o644,
                          owner=USER):
                changed = True
                ctx.changed.add("models")
            for bare, entry in plan.add.items():
                ctx.note(f"registered user.{bare} ({entry['checkpoint']}, {entry['recipe']})")
        for name in plan.missing:
            ctx.warn(f"slot model {name!r} is neither in lemond's catalogue nor registered, "
                     "and hal0 does not know its checkpoint, so it cannot load. Register "
                     f"it: python manage.py install --only models --checkpoint "
                     f"{name}=ORG/REPO:VARIANT")
        return self._status(changed)

    # -- 7 ----------------------------------------------------------------------------------
    def step_units(self) -> str:
        ctx, o = self.ctx, self.options
        config, _ = self._config()
        lemond_port = int(config.get("port", 13305))
        changed = ensure_dir(ctx, ctx.path(ENV_DIR), mode=0o755)
        env_path = ctx.path(ENV_FILE)
        existing = env_path.read_text() if env_path.exists() else None
        content, notes = units.env_content(existing, lemond_port)
        if write_file(ctx, env_path, content, mode=0o600, secret=True):
            changed = True
            ctx.changed.add("env")
            for text in notes:
                ctx.note(f"{ENV_FILE}: {'would have ' if ctx.dry_run else ''}{text}")
        unit_changed = False
        rendered = units.render_units(lemond_port=lemond_port, host=o.host, port=o.port)
        for name, text in rendered.items():
            if write_file(ctx, ctx.path(UNIT_DIR) / name, text, mode=0o644):
                unit_changed = True
                ctx.changed.add(name)
                if not ctx.dry_run:
                    ctx.note(f"wrote {UNIT_DIR}/{name}")
        if unit_changed:
            ctx.runner.run(["systemctl", "daemon-reload"])
        return self._status(changed or unit_changed)

    # -- 8 ----------------------------------------------------------------------------------
    def step_hal0(self) -> str:
        ctx = self.ctx
        session = ctx.hal0()
        reason = session.unavailable()
        if reason:
            if ctx.dry_run:
                ctx.note(f"would run as {USER} with {ENV_FILE}: migrate, collectstatic, "
                         "seed the default slots, ensure_admin")
                return WOULD
            raise StepFailed(f"cannot set up hal0: {reason}",
                             "run the whole installer (not only this step) once")
        source = self.options.admin_password_file
        reply = session.request("setup", dry_run=ctx.dry_run,
                                admin_password=self.admin_password,
                                admin_password_source=source and os.path.abspath(source))
        for line in reply.get("output", "").splitlines():
            if line.strip():
                ctx.note(line)
        for text in reply["changes"]:
            ctx.note(text)
        if reply["changes"] and not ctx.dry_run:
            ctx.changed.add("hal0")
        return self._status(bool(reply["changes"]))

    # -- 9 ----------------------------------------------------------------------------------
    def _ensure_running(self, unit: str, triggers: set[str]) -> bool:
        ctx, runner = self.ctx, self.ctx.runner
        enabled, active = runner.unit_enabled(unit), runner.unit_active(unit)
        why = sorted(triggers & ctx.changed)
        if not active:
            runner.run(["systemctl", "enable", "--now", unit])
            return True
        if why:
            if not enabled:
                runner.run(["systemctl", "enable", unit])
            ctx.note(f"restarting {unit}: {', '.join(why)} changed")
            runner.run(["systemctl", "restart", unit])
            return True
        if not enabled:
            runner.run(["systemctl", "enable", unit])
            return True
        return False

    def step_start(self) -> str:
        ctx, o = self.ctx, self.options
        config, _ = self._config()
        lemond_port = int(config.get("port", 13305))
        changed = self._ensure_running(
            LEMONADE_UNIT, {"lemond", "config", "models", LEMONADE_UNIT})
        waits = ctx.wait_for_services or ctx.dry_run
        if waits:
            if not ctx.dry_run:
                ctx.note(f"waiting up to {o.wait_timeout:g} s for lemond …")
            ok, detail = ctx.runner.wait_http(f"http://127.0.0.1:{lemond_port}/live",
                                              o.wait_timeout)
            if ok and not ctx.dry_run:
                ctx.note("lemond is up")
            elif not ok:
                ctx.warn("!" * 60)
                ctx.warn(f"lemond did not answer on 127.0.0.1:{lemond_port} within "
                         f"{o.wait_timeout:g} s ({detail}).")
                ctx.warn("hal0 starts anyway and shows the 'lemond unreachable' banner.")
                ctx.warn(f"Check: systemctl status {LEMONADE_UNIT}; journalctl -u "
                         f"{LEMONADE_UNIT} -n 50 --no-pager")
                ctx.warn("!" * 60)
        changed |= self._ensure_running(API_UNIT, {"env", "hal0", API_UNIT})
        if waits:
            probe = "127.0.0.1" if o.host in ("0.0.0.0", "::", "") else o.host
            url = f"http://{probe}:{o.port}/api/health"
            ok, detail = ctx.runner.wait_http(url, max(o.wait_timeout, 1.0),
                                              ok=lambda r: r.status_code in (200, 503))
            if not ok:
                raise StepFailed(f"hal0 did not answer at {url} within "
                                 f"{max(o.wait_timeout, 1.0):g} s ({detail})",
                                 f"journalctl -u {API_UNIT} -n 50 --no-pager; systemctl "
                                 f"status {API_UNIT}; an HTTP 400 means the address is "
                                 f"missing from HAL0_ALLOWED_HOSTS in {ENV_FILE}")
            if not ctx.dry_run:
                ctx.note(f"hal0 is up at {url}")
        elif ctx.root is not None and changed:
            ctx.note("not waiting for the services under --root (nothing runs there)")
        return self._status(changed)

    # -- 10 ---------------------------------------------------------------------------------
    def step_summary(self) -> str:
        ctx, o, out = self.ctx, self.options, self.out
        titles = {name: title for name, title, _ in STEPS}
        titles["lemond"] = f"lemond v{self._version()}"
        changed = [n for n, s in self.results.items() if s in (CHANGED, WOULD)]
        in_place = [n for n, s in self.results.items() if s == IN_PLACE]
        if ctx.dry_run:
            out.line("       dry run: nothing was changed.")
            out.line("       would change: " + (", ".join(titles[n] for n in changed)
                                                  or "nothing"))
        else:
            out.line("       changed: " + (", ".join(titles[n] for n in changed) or "nothing"))
        out.line("       already in place: " + (", ".join(titles[n] for n in in_place)
                                                 or "nothing"))
        if self.would_stop:
            out.error("       a real install would stop at step 1 (preflight): fix the "
                      "problems marked 'a real install would stop here'")
        elif not changed:
            out.success("       Everything was already in place.")
        for text in ctx.warnings:
            out.warning(f"       warning: {text}")
        if ctx.root is not None and not ctx.dry_run:
            out.line(f"       {len(ctx.runner.recorded)} system command(s) recorded this run "
                     f"(log: {ctx.path(RECORD_LOG)})")
        host = o.host if o.host not in ("0.0.0.0", "::") else platform.node()
        out.line(f"       hal0: http://{host}:{o.port}/   (admin: http://{host}:{o.port}/admin/)")
        out.line("       next steps:")
        out.line("         - log in with the admin login printed in step 8 (first run only)")
        out.line("         - pick models for your slots on the dashboard; lemond downloads "
                 "them on first load")
        out.line(f"         - logs: journalctl -u {LEMONADE_UNIT} -u {API_UNIT} -f")
        out.line("         - change lemond settings: python manage.py install --only config "
                 "--set key.path=value")
        return DONE
