"""The out-of-scope list: which of lemond's own tests the simulator is not meant to pass.

`expectations.toml` names each such test, per lemond tag and suite, with a category and a
reason. Only the categories below exist (issue #10): everything else lemond's suites test is
in scope, and a test is never excused just because the simulator fails it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

EXPECTATIONS_FILE = Path(__file__).resolve().parent / "expectations.toml"

CATEGORIES = {
    "model-output": "asserts about real model output (a stop word honoured, prompt-cache "
                    "reuse, an MP3 header, what a transcription says)",
    "collections-router": "collections and the router (collection.*, /v1/routing/validate)",
    "cloud-providers": "cloud providers",
    "ollama-anthropic": "the Ollama and Anthropic APIs",
    "image-edits": "image edits, variations and upscale",
    "realtime-websocket": "the /realtime websocket",
    "network": "needs Hugging Face or the network",
}


@dataclass(frozen=True)
class OutOfScope:
    tag: str
    suite: str
    test: str  # a test method name (or `Class.method`), fnmatch patterns allowed
    category: str
    reason: str


class ExpectationsError(ValueError):
    pass


def load(path: Path = EXPECTATIONS_FILE) -> list[OutOfScope]:
    """Parse and check the file: every entry needs an allowed category and a reason."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    entries = []
    for tag, suites in data.items():
        if not isinstance(suites, dict):
            raise ExpectationsError(f"{tag}: expected a table of suites")
        for suite, tests in suites.items():
            if not isinstance(tests, dict):
                raise ExpectationsError(f"{tag}.{suite}: expected a table of tests")
            for test, entry in tests.items():
                where = f"{tag}.{suite}.{test}"
                if not isinstance(entry, dict):
                    raise ExpectationsError(f"{where}: expected {{category, reason}}")
                unknown = set(entry) - {"category", "reason"}
                if unknown:
                    raise ExpectationsError(f"{where}: unknown key(s) {sorted(unknown)}")
                category = entry.get("category")
                if category not in CATEGORIES:
                    raise ExpectationsError(
                        f"{where}: category {category!r} is not one of {sorted(CATEGORIES)}")
                reason = entry.get("reason")
                if not isinstance(reason, str) or not reason.strip():
                    raise ExpectationsError(f"{where}: a reason is required")
                entries.append(OutOfScope(tag, suite, test, category, reason.strip()))
    return entries


def patterns_for(entries: list[OutOfScope], tag: str, suite: str) -> list[str]:
    return [e.test for e in entries if e.tag == tag and e.suite == suite]
