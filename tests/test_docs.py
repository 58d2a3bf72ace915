"""The README and docs/ against the code they describe.

Every option of the command line is in the README's options table with its default, every relative link
of the README and docs/ resolves (files and headings), the README's first screen holds the quickstart that
CI runs, and neither --help nor a docstring carries a measured speed-up (those live in docs/speed.md).
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from mucodec.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FIRST_SCREEN = 24  # lines
SPEED_UP = re.compile(r"\d(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?\s*[x×]\s+(?:faster|slower)", re.I)


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def section(text: str, title: str) -> list[str]:
    """The lines under the heading ``title`` up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#{1,6})\s+(.+?)\s*$", line)
        if m and m.group(2) == title:
            level = len(m.group(1))
            body = []
            for rest in lines[i + 1:]:
                h = re.match(r"^(#{1,6})\s", rest)
                if h and len(h.group(1)) <= level:
                    break
                body.append(rest)
            return body
    raise AssertionError(f"README.md has no section {title!r}")


def table_rows(lines: list[str]) -> list[list[str]]:
    """The body rows of the markdown tables in ``lines``, as lists of cells (header and rule left out)."""
    rows, header_seen = [], False
    for line in lines:
        if not line.startswith("|"):
            header_seen = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
            continue
        if not header_seen:
            header_seen = True
            continue
        rows.append(cells)
    return rows


def options_table() -> dict[str, list[str]]:
    """Option string -> its row of the README's options table."""
    rows = table_rows(section(README.read_text(encoding="utf-8"), "Options"))
    assert rows, "the README's Options section holds no table"
    table = {}
    for row in rows:
        for code in re.findall(r"`([^`]+)`", row[0]):
            for option in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", code):
                assert option not in table, f"{option} has two rows in the README's options table"
                table[option] = row
    return table


def parser_options() -> dict[str, object]:
    return {s: a for a in build_parser()._actions for s in a.option_strings}


def test_every_cli_option_is_in_the_readme_options_table():
    table, options = options_table(), parser_options()
    missing = sorted(set(options) - set(table))
    assert not missing, f"the README's options table lacks {', '.join(missing)}"
    stale = sorted(set(table) - set(options))
    assert not stale, f"the README's options table lists {', '.join(stale)}, which the command line lacks"


def test_options_table_states_the_parser_defaults():
    table = options_table()
    for option, action in parser_options().items():
        default = action.default
        if default is None or default == argparse.SUPPRESS or not option.startswith("--"):
            continue
        if option not in table:
            continue  # test_every_cli_option_is_in_the_readme_options_table names it
        cell = table[option][1]
        expected = "off" if default is False else str(default)
        assert expected in cell, f"README says the default of {option} is {cell!r}; the parser's is {default!r}"


def relative_links(path: Path) -> list[str]:
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    links = relative_links(path)
    if path == README:
        assert any(t.startswith("docs/") for t in links), "the README links no page of docs/"
    for target in links:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name} links {target}, which does not exist"
        if anchor:
            assert dest.suffix == ".md", f"{path.name} links {target}: an anchor into a file without headings"
            assert anchor in anchors(dest), f"{path.name} links {target}: {dest.name} has no such heading"


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert DOCS and not unlinked, f"the README links no docs/{', docs/'.join(unlinked)}"


def quickstart() -> list[str]:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^```\w*\n(.*?)^```", "\n".join(section(text, "Quickstart")), flags=re.S | re.M)
    assert m, "the README's Quickstart holds no code block"
    return [line.split("#")[0].strip() for line in m.group(1).splitlines() if line.split("#")[0].strip()]


def test_first_screen_holds_install_first_run_and_tests():
    commands = quickstart()
    assert len(commands) == 3, f"the quickstart is {len(commands)} commands, not install, run and test"
    install, run, test = commands
    assert install.startswith("pip install -r requirements")
    assert run.startswith("python3 generate.py")
    assert test.startswith("python -m pytest")
    screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:FIRST_SCREEN])
    for command in commands:
        assert command in screen, f"{command!r} is not on the README's first {FIRST_SCREEN} lines"


def test_ci_runs_the_readme_install_and_test_commands():
    install, _, test = quickstart()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^{re.escape(install)}\s*$", ci, flags=re.M), f".ci/run does not run {install!r}"
    assert re.search(rf"^{re.escape(test)}(\s|$)", ci, flags=re.M), f".ci/run does not run {test!r}"


def test_help_says_what_options_do_without_measured_speed_ups():
    text = build_parser().format_help()
    assert not SPEED_UP.search(text), f"--help quotes a speed-up: {SPEED_UP.search(text).group(0)!r}"
    assert "docs/speed.md" in text  # where the figures are


def test_docstrings_quote_no_speed_ups():
    found = []
    for path in sorted((ROOT / "mucodec").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node) or ""
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in SPEED_UP.finditer(doc)]
    assert not found, "docstrings quote speed-ups (they belong in docs/speed.md): " + "; ".join(found)


def test_speed_up_pattern_catches_the_figures_it_is_for():
    for text in ("about 2.6x faster", "1.5-1.9x faster", "1.4–1.8× faster", "7x slower"):
        assert SPEED_UP.search(text), text
    for text in ("2.25x fewer multiply-adds", "48 kHz", "(default: 3)"):
        assert not SPEED_UP.search(text), text
