"""docs/DIFFERENCES.md and the README's table of it: the same entries, and only tests that exist.

Every `### anchor` entry of DIFFERENCES.md has one row in the README's "Every difference at a glance"
table, both cite the same tests, every cited test file defines the cited function, and every entry cites a
test unless it is in UNTESTED below.
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DIFFERENCES = REPO / "docs" / "DIFFERENCES.md"
README = REPO / "README.md"
TABLE_HEADING = "### Every difference at a glance"

# Entries that no test pins. Each one is either hard to test on this project's CPU tests or documents a
# detail too small to be worth a test; add a test and remove the name here (the test below fails if an
# entry listed here starts citing a test).
UNTESTED = {
    "signals-where-available",  # signal registration depends on the platform (Windows has no SIGUSR1)
    "test-only-with-test-split",  # no shipped config has a test split; every training test passes --no-test
    "datamodule-built-once",  # worker reseeding needs loader worker processes; no test starts them
    "logvar-buffer",  # the official failure needs timesteps on a GPU
    "plain-ldm-optimizer",  # no test trains a plain LDM without an embedding manager
    "x0-elbo-weights",  # the weights matter only with original_elbo_weight > 0, which no config sets
    "validation-image-timing",  # kept official ImageLogger timing; not asserted by a test
    "bare-name-flag",  # kept official argparse quirk (`-n` alone names the run "True"); not asserted
    "clip-float32",  # the official fp16 scores need CUDA; the float32 default is not asserted
}

# tests/test_x.py, test_x.py, test_x.py::name, test_x.py::Class::method, test_x.py::name[param]
TEST_ID = re.compile(r"(?<![\w/.])(?:tests/)?(test_\w+\.py)(?:::((?:\w+::)*\w+)(?:\[[^\]\s]*\])?)?")
BARE_TEST_NAME = re.compile(r"`(test_\w+)`")
ROW_LINK = re.compile(r"^\|\s*\[([\w-]+)\]\(docs/DIFFERENCES\.md#([\w-]+)\)\s*\|")


def differences_entries() -> dict[str, tuple[str, str]]:
    """anchor -> (section, body) for every `### anchor` of DIFFERENCES.md."""
    entries, section, anchor = {}, None, None
    for line in DIFFERENCES.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section, anchor = line[3:].strip(), None
        elif line.startswith("### "):
            anchor = line[4:].strip()
            assert anchor not in entries, f"duplicate entry {anchor}"
            entries[anchor] = (section, "")
        elif anchor is not None:
            entries[anchor] = (section, entries[anchor][1] + line + "\n")
    return entries


def readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    fidelity = text.index("## Fidelity and fixes")
    start = text.index(TABLE_HEADING, fidelity)
    end = re.compile(r"^#{2,3} ", re.M).search(text, start + len(TABLE_HEADING))
    return text[start:end.start() if end else len(text)]


def readme_rows() -> dict[str, tuple[str, str]]:
    """anchor -> (section, tests cell) for every row of the README table."""
    rows, section = {}, None
    for line in readme_table().splitlines():
        bold = re.fullmatch(r"\*\*(.+)\*\*", line.strip())
        if bold:
            section = bold.group(1)
        match = ROW_LINK.match(line)
        if match:
            text, anchor = match.groups()
            assert text == anchor, f"README row links {anchor} with the text {text}"
            assert anchor not in rows, f"README has two rows for {anchor}"
            rows[anchor] = (section, line.rstrip().rstrip("|").rsplit("|", 1)[1].strip())
    return rows


def cited_tests(text: str) -> set[str]:
    """`file.py` or `file.py::name` for every pytest id in `text` (no `tests/`, no parameters)."""
    return {f"{file}::{name}" if name else file for file, name in TEST_ID.findall(text)}


def defines(file: str, name: str) -> bool:
    source = (TESTS / file).read_text(encoding="utf-8")
    return re.search(rf"^\s*(?:async\s+)?def {re.escape(name)}\(", source, re.M) is not None


def test_every_entry_has_one_readme_row_and_back():
    entries, rows = differences_entries(), readme_rows()
    assert len(entries) > 50, "DIFFERENCES.md was not parsed"
    assert sorted(set(entries) - set(rows)) == [], "entries without a README row"
    assert sorted(set(rows) - set(entries)) == [], "README rows without a DIFFERENCES.md entry"
    wrong = {a: (rows[a][0], entries[a][0]) for a in entries if rows[a][0] != entries[a][0]}
    assert wrong == {}, "README row under another section than its entry (README, DIFFERENCES.md)"


def test_cited_tests_exist():
    texts = {"docs/DIFFERENCES.md": DIFFERENCES.read_text(encoding="utf-8"), "README table": readme_table()}
    missing = []
    for where, text in texts.items():
        for cited in sorted(cited_tests(text)):
            file, _, name = cited.partition("::")
            if not (TESTS / file).is_file():
                missing.append(f"{where}: {cited} (no file tests/{file})")
            elif name and not defines(file, name.split("::")[-1]):
                missing.append(f"{where}: {cited} (tests/{file} has no def {name.split('::')[-1]})")
        for name in sorted(set(BARE_TEST_NAME.findall(text))):
            if not any(defines(path.name, name) for path in TESTS.glob("test_*.py")):
                missing.append(f"{where}: {name} (no test file defines it)")
    assert missing == []


def test_every_entry_cites_a_test_and_the_readme_the_same():
    entries, rows = differences_entries(), readme_rows()
    assert UNTESTED <= set(entries), f"UNTESTED names no entry: {sorted(UNTESTED - set(entries))}"
    untested = sorted(a for a, (_, body) in entries.items() if not cited_tests(body))
    assert untested == sorted(UNTESTED), "entries without a test differ from UNTESTED"
    for anchor, (_, body) in entries.items():
        if anchor not in rows:
            continue  # reported by test_every_entry_has_one_readme_row_and_back
        cell = rows[anchor][1]
        if anchor in UNTESTED:
            assert cell == "none", f"README row {anchor}: write none for an entry without a test"
        else:
            assert cited_tests(cell) == cited_tests(body), f"README row {anchor} cites other tests than its entry"
