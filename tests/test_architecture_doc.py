"""docs/ARCHITECTURE.md stays true: every test it names exists, every rule it states names one,
and the path of `--rank` it draws runs through functions that exist, in at most 20 hops."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
NAMED_TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _defines(path: Path, name: str) -> bool:
    return re.search(rf"^\s*(def|class) {name}\b", path.read_text(), re.MULTILINE) is not None


def _section(title: str) -> str:
    start = DOC.index(title)
    end = DOC.find("\n#", start + len(title))
    return DOC[start:end if end != -1 else None]


def _numbered_items(text: str) -> list[str]:
    """The items of the numbered list(s) in `text`, continuation lines joined."""
    items: list[str] = []
    for line in text.splitlines():
        if re.match(r"^\d+\. ", line):
            items.append(line)
        elif items and line.startswith("   ") and line.strip():
            items[-1] += " " + line.strip()
    return items


def test_every_test_the_document_names_exists():
    named = NAMED_TEST.findall(DOC)
    assert len(named) >= 15
    missing = [f"{file}::{name}" for file, name in named if not _defines(ROOT / file, name)]
    assert not missing, f"ARCHITECTURE.md names tests that do not exist: {missing}"


def test_every_rule_names_a_test_that_exists():
    rules = _numbered_items(_section("## Import layering"))
    assert len(rules) >= 9
    unnamed = [rule[:60] for rule in rules if not NAMED_TEST.search(rule)]
    assert not unnamed, f"rules without a named test: {unnamed}"


def test_the_rank_path_is_at_most_20_hops_through_functions_that_exist():
    hops = _numbered_items(_section("### Path of one flag"))
    assert 5 <= len(hops) <= 20, f"{len(hops)} hops"
    for hop in hops:
        match = re.match(r"^\d+\. `([\w/]+\.py)` `(\w+)`", hop)
        assert match, f"a hop names its file and function: {hop[:70]}"
        path, function = ROOT / match[1], match[2]
        assert _defines(path, function), f"{match[1]} defines no `{function}`"
