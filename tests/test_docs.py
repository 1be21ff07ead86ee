"""README.md and docs/**/*.md point at things that exist: every repository file and make
target that a code block's command names, every Python module run with ``-m``, and every
relative link (with its ``#anchor`` when it has one). New pages and tools are picked up
without editing this file."""
import re

import pytest

from conftest import REPO

PAGES = [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
# A repository path in a command: tools/x.py, configs/a/b.yaml, tests/test_x.py, ... It may
# follow "=" or ":" (compare_recall's NAME=CONFIG:WEIGHTS), not another path character.
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:tools|configs|projects|tests|docs|benchmarks)/[\w./-]*\w)")
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+((?:[\w.-]+=\S*\s+)*)([\w.-]+)")
MODULE = re.compile(r"python\S*\s+-m\s+([\w.]+)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _page_id(path):
    return str(path.relative_to(REPO))


def _code_blocks(text):
    return FENCE.findall(text)


def _prose(text):
    """The page without its fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _make_targets():
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, flags=re.M))
    for line in re.findall(r"^\.PHONY\s*:(.*)$", text, flags=re.M):
        targets.update(line.split())
    return targets


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    heading = re.sub(r"[`*]", "", heading.strip()).lower()
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(path):
    seen, anchors = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", path.read_text()), flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else "{}-{}".format(slug, n))
    return anchors


def _module_exists(name):
    parts = name.split(".")
    if parts[0] != "fpn_rpn":
        return True  # pytest, pip, ...: not this repository's to check
    base = REPO / "projects" / "/".join(parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def test_pages_are_found():
    assert REPO / "README.md" in PAGES and len(PAGES) > 1


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_commands_name_files_and_make_targets_that_exist(page):
    targets = _make_targets()
    missing = []
    for block in _code_blocks(page.read_text()):
        for path in REPO_PATH.findall(block):
            if not (REPO / path).exists():
                missing.append(path)
        for line in block.splitlines():
            command = line.split("#", 1)[0]
            for _, target in MAKE.findall(command):
                if target not in targets:
                    missing.append("make " + target)
            for module in MODULE.findall(command):
                if not _module_exists(module):
                    missing.append("-m " + module)
    assert not missing, "{} names what does not exist: {}".format(_page_id(page), missing)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):
            continue  # https:, mailto:, ...
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target + " (no such heading)")
    assert not broken, "{} has broken links: {}".format(_page_id(page), broken)


def test_the_checks_catch_a_missing_file_a_missing_target_and_a_broken_link(tmp_path):
    page = "```bash\npython tools/no_such_tool.py --config-file configs/nope.yaml\nmake no-such-target\n```\n"
    (block,) = _code_blocks(page)
    assert REPO_PATH.findall(block) == ["tools/no_such_tool.py", "configs/nope.yaml"]
    assert [t for _, t in MAKE.findall("make test PYTHON=/x/python3")] == ["test"]
    assert [t for _, t in MAKE.findall("make no-such-target")] == ["no-such-target"]
    assert "no-such-target" not in _make_targets() and {"test", "demo"} <= _make_targets()
    assert REPO_PATH.findall("--model a=configs/x.yaml:output/m.pth") == ["configs/x.yaml"]
    assert REPO_PATH.findall("/path/to/fpn_rpn/projects/fpn_rpn") == []
    assert not _module_exists("fpn_rpn.no_such_module") and _module_exists("fpn_rpn.check_env")
    assert LINK.findall(_prose("[a](docs/x.md) `[b](y.md)` ![c](z.png)")) == ["docs/x.md", "z.png"]
    assert _slug("Real photographs: does one NMS across levels help? (the paired study)") == (
        "real-photographs-does-one-nms-across-levels-help-the-paired-study"
    )
    assert _slug("`tools/compare_recall.py`: one recall table") == "toolscompare_recallpy-one-recall-table"
