"""The code the docs show is the code the tests run: every block marked
`<!-- from: PATH -->` must appear, as it is, in that file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "docs" / "migrating-from-channels.md"]
MARKED_BLOCK = re.compile(r"<!-- from: (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)\n```", re.S)


def marked_blocks() -> list[tuple[str, str, str]]:
    return [
        (doc.name, match["path"], match["code"])
        for doc in DOCS
        for match in MARKED_BLOCK.finditer(doc.read_text())
    ]


def test_the_guide_quotes_what_the_tests_run() -> None:
    quoted = {path for _, path, _ in marked_blocks()}
    assert {
        "tests/integrations/django_site/urls.py",
        "tests/integrations/celery_app.py",
        "docs/examples/useTaskStream.js",
        "tests/test_react_hook.py",
    } <= quoted


@pytest.mark.parametrize("doc, path, code", marked_blocks())
def test_each_quoted_block_is_in_its_file(doc: str, path: str, code: str) -> None:
    source = (ROOT / path).read_text()
    assert code in source, f"{doc}: a block quoted from {path} is not in it (any more)"
