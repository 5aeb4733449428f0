"""Runs one of lemond's test suites in this process and writes each test's outcome as JSON.

Started by the conformance runner (`runner.py`) once per suite, with the suite's server
(the hal0 lemond simulator) already listening. It is stdlib-only and standalone: it runs
under the suite's own `test/` directory on `sys.path`, exactly as `python test/<suite>.py`
would, and goes through the suite's own `__main__` (so `run_server_tests` applies the
suite's wrapped server, backend, modality and `/internal/set` configuration), but with a
unittest runner that

* never fails fast (lemond's does: one failure would hide the rest of the table),
* does not run the out-of-scope tests at all (they are recorded as such),
* bounds every test with a timeout, so a simulator that never answers fails a test instead
  of hanging the run, and
* refuses any connection that is not to a loopback address, so a test that would reach the
  network fails instead of reaching it.

Usage: harness.py SUITE_FILE RESULT_JSON OUT_OF_SCOPE_JSON TIMEOUT [suite args...]
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import runpy
import signal
import socket
import sys
import time
import traceback
import unittest

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class TestTimeout(Exception):
    """Raised inside a test that ran past its time budget."""


def _is_loopback(host) -> bool:
    if host is None:
        return True  # getaddrinfo(None, port): a local wildcard/loopback lookup
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").lower()
    if host in LOOPBACK_NAMES or host == "":
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def guard_network() -> None:
    """Only loopback: conformance runs must never reach Hugging Face or anything else."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            raise OSError(f"conformance harness: network access to {host!r} refused "
                          "(loopback only)")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise OSError(f"conformance harness: connection to {address[0]!r} refused "
                          "(loopback only)")
        return real_connect(self, address)

    socket.socket.connect = connect


def short_name(test: unittest.TestCase) -> str:
    """`Class.test_method`, whatever module name the suite was imported under."""
    parts = test.id().split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else test.id()


def first_line(text: str, limit: int = 300) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # the last line of a traceback is the exception; keep it short for the table
    line = lines[-1] if lines else ""
    return line[:limit]


def describe(err, limit: int = 300) -> str:
    """The exception's type and the first line of its message (an assertion message
    may go on with a server log, which is not what the table needs)."""
    exc_type, exc, _ = err
    text = "".join(traceback.format_exception_only(exc_type, exc)).strip()
    return (text.splitlines() or [""])[0][:limit]


class RecordingResult(unittest.TextTestResult):
    """Keeps one outcome per test; a failing setUpClass fails every test of its class."""

    def __init__(self, *args, records: dict, timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = records
        self.timeout = timeout

    def _set(self, test, outcome: str, detail: str = "") -> None:
        name = short_name(test)
        if name in self.records and self.records[name]["outcome"] == "failed":
            return  # a tearDown error after a failure keeps the first failure
        self.records[name] = {"outcome": outcome, "detail": detail}

    def startTest(self, test):
        super().startTest(test)
        self._started = time.monotonic()
        if self.timeout > 0:
            signal.setitimer(signal.ITIMER_REAL, self.timeout)

    def stopTest(self, test):
        signal.setitimer(signal.ITIMER_REAL, 0)
        super().stopTest(test)
        record = self.records.get(short_name(test))
        if record is not None:
            record["seconds"] = round(time.monotonic() - self._started, 2)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._set(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set(test, "failed", describe(err))

    def addError(self, test, err):
        super().addError(test, err)
        detail = describe(err)
        if isinstance(test, unittest.case._SubTest):
            test = test.test_case
        if not isinstance(test, unittest.TestCase):  # setUpClass/tearDownClass holder
            self.records.setdefault("__class_errors__", []).append(
                {"where": str(test), "detail": detail})
            return
        self._set(test, "failed", detail)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._set(test, "skipped", str(reason)[:300])

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._set(test, "passed", "expected failure")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._set(test, "failed", "unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._set(test, "failed", describe(err))


def flatten(suite) -> list[unittest.TestCase]:
    tests = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            tests.extend(flatten(item))
        else:
            tests.append(item)
    return tests


def make_runner_class(records: dict, out_of_scope: list[str], timeout: float):
    def is_out_of_scope(test) -> bool:
        name = short_name(test)
        method = name.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(method, pattern) or fnmatch.fnmatchcase(name, pattern)
                   for pattern in out_of_scope)

    class ConformanceRunner(unittest.TextTestRunner):
        def __init__(self, *args, **kwargs):
            kwargs["failfast"] = False
            kwargs["verbosity"] = 2
            super().__init__(*args, **kwargs)

        def _makeResult(self):
            return RecordingResult(self.stream, self.descriptions, self.verbosity,
                                   records=records, timeout=timeout)

        def run(self, test):
            kept = unittest.TestSuite()
            for case in flatten(test):
                if is_out_of_scope(case):
                    records[short_name(case)] = {"outcome": "out_of_scope", "detail": ""}
                else:
                    records[short_name(case)] = {"outcome": "not_run", "detail": ""}
                    kept.addTest(case)
            result = super().run(kept)
            # Tests a failing setUpClass kept from running count as failures.
            class_errors = records.get("__class_errors__", [])
            detail = class_errors[0]["detail"] if class_errors else "did not run"
            for record in records.values():
                if isinstance(record, dict) and record.get("outcome") == "not_run":
                    record.update(outcome="failed", detail=f"not run: {detail}")
            return result

    return ConformanceRunner


def main(argv: list[str]) -> int:
    suite_file, result_path, scope_path, timeout = argv[:4]
    suite_args = argv[4:]
    with open(scope_path, encoding="utf-8") as fh:
        out_of_scope = json.load(fh)
    records: dict = {}

    def on_alarm(signum, frame):
        raise TestTimeout(f"test ran past the conformance timeout ({timeout}s)")

    signal.signal(signal.SIGALRM, on_alarm)
    guard_network()

    test_dir = os.path.dirname(os.path.abspath(suite_file))
    sys.path[:] = [test_dir, os.path.dirname(test_dir)] + [
        p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(__file__)]
    sys.argv = [suite_file, *suite_args]
    runner_class = make_runner_class(records, out_of_scope, float(timeout))
    # Suites end in run_server_tests() (or unittest.main()), both of which build a
    # TextTestRunner at call time: hand them ours.
    unittest.TextTestRunner = runner_class
    unittest.runner.TextTestRunner = runner_class
    crash = None
    try:
        runpy.run_path(suite_file, run_name="__main__")
    except SystemExit:
        pass
    except BaseException:
        crash = traceback.format_exc()
        print(crash, file=sys.stderr)
    records.pop("__class_errors__", None)
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump({"tests": records, "crash": crash and first_line(crash)}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
