"""The conformance runner's own parts that need no lemond checkout (issue #10):
the out-of-scope list, and the harness that runs a suite without failing fast."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from providers.lemonade.conformance import expectations, runner


def test_expectations_file_parses_with_allowed_categories_and_reasons():
    entries = expectations.load()
    for entry in entries:
        assert entry.category in expectations.CATEGORIES
        assert entry.reason
        assert entry.tag in runner.TAGS, entry
        assert entry.suite in {s.name for s in runner.SUITES}, entry
    keys = [(e.tag, e.suite, e.test) for e in entries]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("body, problem", [
    ('["v11.7.0".server_llm]\ntest_x = { category = "too-slow", reason = "r" }\n',
     "category 'too-slow'"),
    ('["v11.7.0".server_llm]\ntest_x = { category = "network", reason = " " }\n',
     "a reason is required"),
    ('["v11.7.0".server_llm]\ntest_x = { category = "network" }\n', "a reason is required"),
    ('["v11.7.0".server_llm]\ntest_x = "network"\n', "expected {category, reason}"),
])
def test_expectations_refuse_an_entry_without_an_allowed_category_and_a_reason(
        tmp_path, body, problem):
    path = tmp_path / "expectations.toml"
    path.write_text(body)
    with pytest.raises(expectations.ExpectationsError, match=problem):
        expectations.load(path)


FAKE_SUITE = textwrap.dedent('''
    import socket
    import unittest

    class Broken(unittest.TestCase):
        @classmethod
        def setUpClass(cls):
            raise RuntimeError("server not reachable")

        def test_never_runs(self):
            pass

    class Fake(unittest.TestCase):
        def test_1_fails(self):
            self.assertEqual(1, 2)

        def test_2_passes_after_a_failure(self):
            pass

        def test_3_skips(self):
            self.skipTest("not for this backend")

        def test_4_out_of_scope(self):
            raise AssertionError("must not run")

        def test_5_network_refused(self):
            socket.create_connection(("example.com", 80), timeout=1)

        def test_5b_loopback_by_bytes_name_allowed(self):
            # asyncio hands getaddrinfo the host as bytes
            socket.getaddrinfo(b"localhost", 80)

        def test_6_hangs(self):
            import time
            time.sleep(30)

    if __name__ == "__main__":
        unittest.TextTestRunner(failfast=True).run(
            unittest.defaultTestLoader.loadTestsFromModule(__import__("__main__")))
''')


def test_harness_runs_every_test_records_outcomes_and_keeps_off_the_network(tmp_path):
    suite = tmp_path / "test" / "server_fake.py"
    suite.parent.mkdir()
    suite.write_text(FAKE_SUITE)
    scope = tmp_path / "scope.json"
    scope.write_text(json.dumps(["test_4_*"]))
    result = tmp_path / "result.json"
    subprocess.run([sys.executable, str(runner.HARNESS), str(suite), str(result), str(scope),
                    "2"], check=True, capture_output=True, timeout=60)
    tests = json.loads(result.read_text())["tests"]
    outcomes = {name: t["outcome"] for name, t in tests.items()}
    assert outcomes == {
        "Broken.test_never_runs": "failed",
        "Fake.test_1_fails": "failed",
        "Fake.test_2_passes_after_a_failure": "passed",
        "Fake.test_3_skips": "skipped",
        "Fake.test_4_out_of_scope": "out_of_scope",
        "Fake.test_5_network_refused": "failed",
        "Fake.test_5b_loopback_by_bytes_name_allowed": "passed",
        "Fake.test_6_hangs": "failed",
    }
    assert "server not reachable" in tests["Broken.test_never_runs"]["detail"]
    assert "loopback only" in tests["Fake.test_5_network_refused"]["detail"]
    assert "timeout" in tests["Fake.test_6_hangs"]["detail"]


def test_report_counts_and_records_into_the_doc(tmp_path):
    result = runner.TagResult("v11.7.0", "2b6a7d77c71e551736f6cc8473dc46f479cd156b", [
        runner.SuiteResult("server_llm", {
            "LLMTests.test_a": {"outcome": "passed"},
            "LLMTests.test_b": {"outcome": "failed", "detail": "AssertionError: 404 != 200"},
            "LLMTests.test_c": {"outcome": "skipped", "detail": "no slots"},
            "LLMTests.test_d": {"outcome": "out_of_scope"},
        })])
    text = runner.text_report(result)
    assert "1 of 2 in-scope tests that ran pass (50.0 %)" in text
    assert "server_llm.LLMTests.test_b: AssertionError: 404 != 200" in text
    doc = tmp_path / "conformance.md"
    doc.write_text(f"# title\n\n{runner.BEGIN}\nold\n{runner.END}\n\nafter\n")
    runner.record(doc, [result], "2026-12-07 10:00 UTC")
    written = doc.read_text()
    assert "old" not in written and written.endswith("after\n")
    assert "| server_llm | 1 | 1 | 1 | 1 |" in written
    assert "2b6a7d77c71e551736f6cc8473dc46f479cd156b" in written


def test_a_saved_run_can_be_reported_and_recorded_again(tmp_path, capsys):
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"date": "2026-12-07 10:00 UTC", "tags": {"v10.6.0": {
        "commit": "7af26f75c0f993a598af0a5191d992f4adf6a51a", "suites": {
            "server_tts": {"crash": None, "tests": {
                "T.test_a": {"outcome": "passed"},
                "T.test_b": {"outcome": "failed", "detail": "AssertionError: x"}}}}}}}))
    doc = tmp_path / "conformance.md"
    doc.write_text(f"{runner.BEGIN}\n{runner.END}\n")
    assert runner.main(["--replay", str(saved), "--record", str(doc)]) == 0
    assert "1 of 2 in-scope tests that ran pass (50.0 %)" in capsys.readouterr().out
    assert "Run on 2026-12-07 10:00 UTC." in doc.read_text()
