"""Run lemond's own suites, tag by tag, each against a fresh `manage.py lemond_sim`.

For every supported lemond tag the runner takes the tag's `test/` folder from LEMONADE_SRC
(a git checkout or a bare git dir: `git archive <tag> test`; a plain source tree is used
as it is, for the one tag its CMakeLists names), and for each suite:

1. starts a fresh simulator in the tag's version shape, on the port that tag's tests talk
   to (13305, or a free port through LEMONADE_TEST_PORT where the tag's tests read it),
   and puts a `lemond` shim on PATH for the tests that launch a second daemon themselves;
2. runs the suite in a child process (`harness.py`) with the wrapped server and backend
   lemond's CI gives it, skipping the tests `expectations.toml` puts out of scope, with
   only loopback connections allowed;
3. stops the simulator and records every test's outcome.

It prints one table per tag (suite, passed, failed, skipped, out of scope) and the failures,
and can write the tables into docs/conformance.md (`--record`). Logs of each suite and its
simulator go to var/conformance/<tag>/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

from providers.lemonade.conformance import expectations

REPO = Path(__file__).resolve().parents[3]
HARNESS = Path(__file__).resolve().parent / "harness.py"
LOG_ROOT = REPO / "var" / "conformance"

# lemond tag → the simulator's --version-shape
TAGS = {"v10.6.0": "10.6", "v11.7.0": "11"}
DEFAULT_PORT = 13305


@dataclass(frozen=True)
class Suite:
    name: str
    args: tuple[str, ...] = ()  # the suite's command line in lemond's CI (minus --cli-binary)


# The suites and the options lemond's CI runs them with (.github/workflows at the tags);
# the backend is the one every simulated device can serve.
SUITES = (
    Suite("server_endpoints"),
    Suite("server_llm", ("--wrapped-server", "llamacpp", "--backend", "cpu")),
    Suite("server_downloads"),
    Suite("server_pinning", ("--wrapped-server", "llamacpp", "--backend", "cpu")),
    Suite("server_eviction", ("--wrapped-server", "llamacpp", "--backend", "cpu")),
    Suite("server_streaming_errors"),
    Suite("server_tts"),
    Suite("server_whisper", ("--wrapped-server", "whispercpp", "--backend", "cpu")),
    Suite("server_sd", ("--backend", "cpu")),
)

OUTCOMES = ("passed", "failed", "skipped", "out_of_scope")


@dataclass
class SuiteResult:
    suite: str
    tests: dict[str, dict] = field(default_factory=dict)
    crash: str | None = None
    seconds: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(1 for t in self.tests.values() if t["outcome"] == outcome)

    def listed(self, outcome: str) -> list[tuple[str, str]]:
        return [(name, t.get("detail", "")) for name, t in sorted(self.tests.items())
                if t["outcome"] == outcome]

    def failures(self) -> list[tuple[str, str]]:
        return self.listed("failed")


@dataclass
class TagResult:
    tag: str
    commit: str
    suites: list[SuiteResult] = field(default_factory=list)

    def total(self, outcome: str) -> int:
        return sum(s.count(outcome) for s in self.suites)

    def in_scope_rate(self) -> float:
        """Passed of the in-scope tests that ran (a suite's own capability skips are
        listed with their reasons, not counted)."""
        passed, failed = self.total("passed"), self.total("failed")
        return 100.0 * passed / (passed + failed) if passed + failed else 0.0


# ---------------------------------------------------------------------------------------
# lemond's sources


def _git(git_args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *git_args], capture_output=True, check=False, **kwargs)


def git_dir_of(src: Path) -> Path | None:
    """The git directory of a checkout or of a bare/mirror git dir, or None."""
    for candidate in (src / ".git", src):
        if candidate.exists() and _git(["--git-dir", str(candidate), "rev-parse",
                                        "--git-dir"]).returncode == 0:
            return candidate
    return None


def tree_version(src: Path) -> str | None:
    """`vX.Y.Z` from a plain source tree's CMakeLists.txt (`project(... VERSION X.Y.Z)`)."""
    with contextlib.suppress(OSError):
        text = (src / "CMakeLists.txt").read_text(encoding="utf-8", errors="replace")
        match = re.search(r"project\s*\([^)]*VERSION\s+(\d+\.\d+\.\d+)", text, re.I)
        if match:
            return f"v{match.group(1)}"
    return None


def extract_tests(src: Path, tag: str, into: Path) -> tuple[Path, str]:
    """The tag's test folder (extracted under `into`) and the tag's commit."""
    git_dir = git_dir_of(src)
    if git_dir is None:
        if tree_version(src) != tag or not (src / "test").is_dir():
            raise SystemExit(f"{src} is not a git repository and not a {tag} source tree")
        return src / "test", "(working tree)"
    commit = _git(["--git-dir", str(git_dir), "rev-parse", "--verify", f"{tag}^{{commit}}"])
    if commit.returncode != 0:
        raise SystemExit(f"{src}: no tag {tag} (fetch lemonade-sdk/lemonade's tags)")
    archive = _git(["--git-dir", str(git_dir), "archive", "--format=tar", tag, "test"])
    if archive.returncode != 0:
        raise SystemExit(f"git archive {tag} test failed: {archive.stderr.decode()[:300]}")
    root = into / tag
    root.mkdir(parents=True)
    tar_path = into / f"{tag}.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(root, filter="data")
    return root / "test", commit.stdout.decode().strip()


# ---------------------------------------------------------------------------------------
# the simulator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def tests_read_port_env(test_dir: Path) -> bool:
    """Do this tag's tests honour LEMONADE_TEST_PORT (v11) or insist on 13305 (v10.6)?"""
    text = (test_dir / "utils" / "test_models.py").read_text(encoding="utf-8")
    return "LEMONADE_TEST_PORT" in text


def simulator_command(shape: str) -> list[str]:
    """`manage.py lemond_sim` in the tag's shape, quick loads and downloads; add --port.
    Streams keep the simulator's default pace (10 ms a token): tests watch a model busy
    while it streams."""
    return [sys.executable, str(REPO / "manage.py"), "lemond_sim", "--version-shape", shape,
            "--load-delay", "0.05", "--pull-delay", "0.2", "--verbose"]


def write_lemond_shim(bin_dir: Path, shape: str) -> None:
    """`lemond [cache_dir] [--port N]`: what a few tests launch to get a second daemon.
    lemond's positional cache dir and its other options are dropped."""
    command = " ".join(f"'{part}'" for part in simulator_command(shape))
    script = f"""#!/bin/sh
# hal0 conformance shim: a `lemond` that is the hal0 lemond simulator.
port={DEFAULT_PORT}
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --port=*) port="${{1#--port=}}"; shift ;;
    *) shift ;;
  esac
done
exec {command} --port "$port"
"""
    shim = bin_dir / "lemond"
    shim.write_text(script, encoding="utf-8")
    shim.chmod(0o755)


class Simulator:
    """One fresh `manage.py lemond_sim` for one suite."""

    def __init__(self, shape: str, port: int, log_path: Path, env: dict[str, str]):
        self.port = port
        self.log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen([*simulator_command(shape), "--port", str(port)],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the simulator exited ({self.proc.returncode}); "
                                   f"see {self.log.name}")
            if port_busy(self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the simulator did not listen on {self.port} in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def silent_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    """The whisper suites fetch a sample from GitHub unless `$TMPDIR/test_speech.wav`
    exists; a local file keeps the run off the network (what it says is out of scope)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))


# ---------------------------------------------------------------------------------------
# running


def run_suite(tag: str, test_dir: Path, suite: Suite, entries, *, timeout: float,
              suite_timeout: float, work: Path, verbose: bool) -> SuiteResult | None:
    suite_file = test_dir / f"{suite.name}.py"
    if not suite_file.exists():
        return None
    logs = LOG_ROOT / tag
    logs.mkdir(parents=True, exist_ok=True)
    shape = TAGS[tag]
    run_dir = work / f"{tag}-{suite.name}"
    tmp_dir, bin_dir = run_dir / "tmp", run_dir / "bin"
    tmp_dir.mkdir(parents=True)
    bin_dir.mkdir()
    silent_wav(tmp_dir / "test_speech.wav")
    write_lemond_shim(bin_dir, shape)

    if tests_read_port_env(test_dir):
        port = free_port()
    else:
        port = DEFAULT_PORT
        if port_busy(port):
            raise SystemExit(f"{tag}'s tests only talk to port {port}, and something "
                             "already listens there: stop it and run again")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LEMONADE_", "HAL0_LEMONADE"))}
    env.update({
        "LEMONADE_TEST_PORT": str(port),
        "TMPDIR": str(tmp_dir),
        "HOME": str(run_dir),  # the suites' HF-cache probes look under $HOME
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "*",
    })
    scope_file = run_dir / "out_of_scope.json"
    scope_file.write_text(json.dumps(expectations.patterns_for(entries, tag, suite.name)))
    result_file = run_dir / "result.json"

    started = time.monotonic()
    sim = Simulator(shape, port, logs / f"{suite.name}.simulator.log", env)
    crash = None
    try:
        sim.wait_listening()
        with open(logs / f"{suite.name}.log", "wb") as log:
            child = subprocess.run(
                [sys.executable, str(HARNESS), str(suite_file), str(result_file),
                 str(scope_file), str(timeout), *suite.args],
                cwd=test_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                timeout=suite_timeout, check=False)
        if child.returncode != 0:
            crash = f"harness exited {child.returncode}"
    except subprocess.TimeoutExpired:
        crash = f"suite ran past {suite_timeout:.0f}s"
    except RuntimeError as exc:
        crash = str(exc)
    finally:
        sim.stop()
    result = SuiteResult(suite.name, seconds=time.monotonic() - started)
    if result_file.exists():
        data = json.loads(result_file.read_text(encoding="utf-8"))
        result.tests = data.get("tests", {})
        crash = crash or data.get("crash")
    result.crash = crash
    if verbose:
        print(f"  {tag} {suite.name}: {result.count('passed')} passed, "
              f"{result.count('failed')} failed ({result.seconds:.0f}s)", flush=True)
    return result


def run_tag(src: Path, tag: str, suites: list[Suite], entries, work: Path, **kwargs
            ) -> TagResult:
    test_dir, commit = extract_tests(src, tag, work / "src")
    result = TagResult(tag, commit)
    for suite in suites:
        suite_result = run_suite(tag, test_dir, suite, entries, work=work, **kwargs)
        if suite_result is not None:
            result.suites.append(suite_result)
    return result


# ---------------------------------------------------------------------------------------
# reporting


def table_rows(result: TagResult) -> list[list[str]]:
    rows = [[s.suite, *(str(s.count(o)) for o in OUTCOMES)] for s in result.suites]
    rows.append(["total", *(str(result.total(o)) for o in OUTCOMES)])
    return rows


HEADER = ["suite", "passed", "failed", "skipped", "out of scope"]


def text_report(result: TagResult) -> str:
    rows = [HEADER, *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"lemond {result.tag} ({result.commit[:12]}), simulator shape "
             f"{TAGS[result.tag]}: {result.total('passed')} of "
             f"{result.total('passed') + result.total('failed')} in-scope tests that ran "
             f"pass ({result.in_scope_rate():.1f} %)"]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                          strict=True)]
        lines.append("  ".join(cells))
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    for suite in result.suites:
        if suite.crash:
            lines.append(f"! {suite.suite}: {suite.crash}")
    skips = [(s.suite, name, detail) for s in result.suites for name, detail in s.listed("skipped")]
    if skips:
        lines.append(f"skipped by the suites ({len(skips)}):")
        lines += [f"  {suite}.{name}: {detail}" for suite, name, detail in skips]
    failures = [(s.suite, name, detail) for s in result.suites for name, detail in s.failures()]
    if failures:
        lines.append(f"failures ({len(failures)}):")
        lines += [f"  {suite}.{name}: {detail}" for suite, name, detail in failures]
    return "\n".join(lines)


def markdown_report(results: list[TagResult], date: str) -> str:
    out = [f"Run on {date}.", ""]
    for result in results:
        out.append(f"### lemond {result.tag} (commit `{result.commit}`), simulator shape "
                   f"`{TAGS[result.tag]}`")
        out.append("")
        ran = result.total("passed") + result.total("failed")
        out.append(f"{result.total('passed')} of {ran} in-scope tests that ran pass "
                   f"({result.in_scope_rate():.1f} %); {result.total('skipped')} skipped "
                   f"by the suites themselves.")
        out.append("")
        out.append("| " + " | ".join(HEADER) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|")
        for row in table_rows(result):
            if row[0] == "total":
                row = [f"**{c}**" for c in row]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        failures = [(s.suite, n, d) for s in result.suites for n, d in s.failures()]
        crashes = [s for s in result.suites if s.crash]
        if failures or crashes:
            out.append("<details><summary>Failures</summary>")
            out.append("")
            out += [f"* `{s.suite}`: {s.crash}" for s in crashes]
            out += [f"* `{suite}.{name}`: {detail.replace('|', '/')}"
                    for suite, name, detail in failures]
            out.append("")
            out.append("</details>")
            out.append("")
        skips = [(s.suite, n, d) for s in result.suites for n, d in s.listed("skipped")]
        if skips:
            out.append("<details><summary>Skipped by the suites</summary>")
            out.append("")
            out += [f"* `{suite}.{name}`: {detail.replace('|', '/')}"
                    for suite, name, detail in skips]
            out.append("")
            out.append("</details>")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


BEGIN, END = "<!-- conformance:begin -->", "<!-- conformance:end -->"


def record(doc: Path, results: list[TagResult], date: str) -> None:
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{markdown_report(results, date)}{END}{tail}",
                   encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m providers.lemonade.conformance",
        description="Run lemond's own test suites against the hal0 lemond simulator.")
    parser.add_argument("--src", default=os.environ.get("LEMONADE_SRC"),
                        help="a lemonade-sdk/lemonade checkout or git dir (LEMONADE_SRC)")
    parser.add_argument("--tag", action="append", choices=sorted(TAGS),
                        help="lemond tag to run (repeatable; default: all supported)")
    parser.add_argument("--suite", action="append",
                        choices=[s.name for s in SUITES], help="suite (repeatable)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one test may take (default 120)")
    parser.add_argument("--suite-timeout", type=float, default=3600.0,
                        help="seconds one suite may take (default 3600)")
    parser.add_argument("--record", type=Path, default=None, metavar="DOC",
                        help="write the tables into DOC (e.g. docs/conformance.md)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every test's outcome to this file")
    parser.add_argument("--quiet", action="store_true", help="no per-suite progress lines")
    parser.add_argument("--replay", type=Path, default=None, metavar="JSON",
                        help="report (and --record) a run saved with --json, run nothing")
    ns = parser.parse_args(argv)
    if ns.replay:
        data = json.loads(ns.replay.read_text(encoding="utf-8"))
        results = [TagResult(tag, info["commit"], [
            SuiteResult(name, suite["tests"], suite.get("crash"))
            for name, suite in info["suites"].items()]) for tag, info in data["tags"].items()]
        for result in results:
            print()
            print(text_report(result))
        if ns.record:
            record(ns.record, results, data["date"])
        return 0
    if not ns.src:
        parser.error("give --src or LEMONADE_SRC (a lemonade-sdk/lemonade checkout/git dir)")
    src = Path(ns.src).expanduser().resolve()
    if not src.exists():
        parser.error(f"{src} does not exist")
    entries = expectations.load()
    tags = ns.tag or list(TAGS)
    suites = [s for s in SUITES if not ns.suite or s.name in ns.suite]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    work = Path(tempfile.mkdtemp(prefix="hal0-conformance-"))
    try:
        for tag in tags:
            if not ns.quiet:
                print(f"lemond {tag}: running {len(suites)} suite(s)...", flush=True)
            results.append(run_tag(src, tag, suites, entries, work, timeout=ns.timeout,
                                   suite_timeout=ns.suite_timeout, verbose=not ns.quiet))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for result in results:
        print()
        print(text_report(result))
    if ns.json:
        ns.json.write_text(json.dumps(
            {"date": date, "tags": {r.tag: {"commit": r.commit, "suites": {
                s.suite: {"crash": s.crash, "tests": s.tests} for s in r.suites}}
                for r in results}}, indent=1), encoding="utf-8")
    if ns.record:
        record(ns.record, results, date)
        print(f"\nrecorded in {ns.record}")
    return 0
