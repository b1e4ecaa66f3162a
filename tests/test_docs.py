"""The documentation runs: every fenced code block of README.md and docs/*.md (docs/RESULTS.md excepted: it records
the commands of long runs) is executed, one test per block, named ``<file>:block<index>:<language>`` (the index
counts every fence of the file, from 0).

* ```python blocks run with ``exec`` in a fresh namespace, in an empty temporary folder as the working directory,
  with ``HF_HUB_OFFLINE=1``.
* A page with the HTML comment ``<!-- blocks share one folder -->`` is a walk-through: its blocks run in order in
  one temporary folder, each seeing what the ones before it wrote.
* ```bash blocks hold ``tagdiff ...`` commands (one per line; a trailing ``\\`` continues a line; ``#`` starts a
  comment). Each runs through ``tagdiff.cli.main(argv)`` (shlex-split, the leading ``tagdiff`` dropped), in order,
  in an empty temporary folder, and must exit 0. A block whose commands are all ``make ...`` is skipped (the
  Makefile's targets set up ``.venv`` and are what CI runs).
* A block with the HTML comment ``<!-- not run: REASON -->`` on the line before its fence is skipped with that
  reason; the reason is required. Any other command in a bash block fails the test, so a block that cannot run
  must say why.
* Blocks in other languages (``text``, ``bibtex``) are not code and are not collected; a fence without a language
  fails.
"""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "RESULTS.md")]
CODE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NOT_CODE = {"text", "bibtex", "markdown", "json", "yaml", "toml"}
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->\s*$")


def fenced_blocks(path):
    """``(index, language, code, skip_reason)`` for every fenced block of ``path``; ``skip_reason`` is the text of a
    ``<!-- not run: ... -->`` comment on the line just before the fence (``""`` if it gives none), else None."""
    text = path.read_text()
    out = []
    for index, m in enumerate(FENCE.finditer(text)):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        out.append((index, m.group(1).lower(), m.group(2), None if marker is None else marker.group(1)))
    return out


def commands(code):
    """The shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [c for c in (shlex.split(line, comments=True) for line in joined.splitlines()) if c]


def collect():
    params = []
    for path in DOC_FILES:
        name = path.relative_to(ROOT).as_posix()
        for index, lang, code, reason in fenced_blocks(path):
            if lang in NOT_CODE:
                continue
            kind = CODE.get(lang, lang or "no-language")
            marks = []
            if reason is not None:
                marks.append(pytest.mark.skip(reason=f"{name} block {index}: not run: {reason}"))
            elif kind == "bash" and (cmds := commands(code)) and all(c[0] == "make" for c in cmds):
                reason_ = f"{name} block {index}: a make target (sets up .venv; CI runs it)"
                marks.append(pytest.mark.skip(reason=reason_))
            params.append(pytest.param(name, index, kind, code, reason, marks=marks,
                                       id=f"{name}:block{index}:{kind}"))
    return params


SHARED = "<!-- blocks share one folder -->"
_shared_dirs: dict[str, Path] = {}


@pytest.fixture
def in_tmp_dir(request, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = request.node.callspec.params["name"]
    folder = tmp_path
    if SHARED in (ROOT / name).read_text():
        if name not in _shared_dirs:
            _shared_dirs[name] = tmp_path_factory.mktemp(Path(name).stem)
        folder = _shared_dirs[name]
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("name, index, kind, code, reason", collect())
def test_doc_block_runs(name, index, kind, code, reason, in_tmp_dir):
    assert kind in ("python", "bash"), f"{name} block {index}: unknown fence language {kind!r}; label it"
    if kind == "python":
        exec(compile(code, f"{name}[block {index}]", "exec"), {"__name__": "__main__"})
        return
    from tagdiff.cli import main

    for argv in commands(code):
        assert argv[0] == "tagdiff", (f"{name} block {index}: {shlex.join(argv)!r} is not a tagdiff command; mark "
                                      "the block <!-- not run: REASON --> if it cannot run in the tests")
        try:
            code_ = main(argv[1:])
        except SystemExit as e:  # --help / --version exit through argparse
            code_ = e.code
        assert code_ in (0, None), f"{name} block {index}: {shlex.join(argv)} exited with {code_}"


def test_every_skip_states_its_reason():
    for path in DOC_FILES:
        for index, lang, _, reason in fenced_blocks(path):
            assert reason is None or reason.strip(), f"{path.name} block {index}: <!-- not run: --> needs a reason"
            assert lang, f"{path.name} block {index}: a fence without a language"


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12_000, "README.md must stay under 12 KB; move detail to docs/"


def test_user_docs_carry_no_project_history():
    pattern = re.compile(r"\b(issue \d+|stop \d+|this session|previous session)\b", re.I)
    for path in DOC_FILES:
        found = pattern.findall(path.read_text())
        assert not found, f"{path.name}: project-history phrasing {found}"


def test_every_notation_section_the_code_cites_exists():
    """Docstrings cite ``docs/notation.md §X`` (ranges such as §4.2–4.4 by both ends); each §X is a heading there, and
    the table of §8 (the method specification's section numbers) points at headings too. No docstring cites the
    specification itself (``TAG.md``), which is not part of the repository."""
    notation = (ROOT / "docs" / "notation.md").read_text()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", notation, re.M))
    table = dict(re.findall(r"^\| §(\d+(?:\.\d+)?) \| (§[\d.–-]+) \|$", notation, re.M))
    for target in table.values():
        for number in re.findall(r"\d+(?:\.\d+)?", target):
            assert number in headings, f"notation.md §8 maps to §{number}, which has no heading"
    cite = re.compile(r"notation\.md((?:(?:,| and|;)? ?§\d+(?:\.\d+)?(?:[-–]\d+(?:\.\d+)?)?)+)")
    cited, spec = set(), []
    for folder in ("src", "benchmarks", "tests", "checkpoints"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if path.name != "test_docs.py" and "TAG.md" in text:
                spec.append(str(path.relative_to(ROOT)))
            for m in cite.finditer(text):
                for a, b in re.findall(r"§(\d+(?:\.\d+)?)(?:[-–](\d+(?:\.\d+)?))?", m.group(1)):
                    cited |= {a, b} - {""}
    assert cited, "no docstring cites docs/notation.md"
    missing = sorted(cited - headings, key=lambda s: [int(p) for p in s.split(".")])
    assert not missing, f"docs/notation.md sections cited in the code that do not exist: {missing}"
    assert not spec, f"files citing TAG.md (not in the repository): {spec}"


def heading_slug(heading):
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_docs_resolve():
    """Relative links of README.md and docs/*.md (RESULTS.md included) name existing files and headings."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = FENCE.sub("", path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            assert dest.is_file(), f"{path.name}: link to a missing file {target}"
            if anchor and dest.suffix == ".md":
                slugs = {heading_slug(h) for h in re.findall(r"^#{1,6} (.*)$", FENCE.sub("", dest.read_text()), re.M)}
                assert anchor in slugs, f"{path.name}: link {target} names no heading of {dest.name}"
