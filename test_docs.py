"""The documentation: README.md is a front door under 350 lines, every relative link in README.md, docs/*.md and
BENCHMARKS.md resolves inside the repo (a `#anchor` to a heading of its page), no page points at material that a
clone does not have, and the docs index lists every page. Plain file reads; no subprocess, no network."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
README_MAX_LINES = 350
FORBIDDEN = ('../shared', 'shared/spec', 'shared/notes', 'spec §')  # not in a user's clone

FENCE = re.compile(r'^(```|~~~).*?^\1[^\n]*$', re.MULTILINE | re.DOTALL)   # fenced code blocks
CODE_SPAN = re.compile(r'(`+)(?:(?!\1).)+?\1', re.DOTALL)          # inline code
INLINE_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)')
REF_LINK = re.compile(r'^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+"[^"]*")?\s*$', re.MULTILINE)
HEADING = re.compile(r'^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$', re.MULTILINE)


def pages() -> list[Path]:
    docs = sorted((ROOT / 'docs').glob('*.md')) if (ROOT / 'docs').is_dir() else []
    return [p for p in [ROOT / 'README.md', ROOT / 'BENCHMARKS.md', *docs] if p.exists()]


def prose(text: str) -> str:
    """The text with code blocks and code spans removed: a link or heading inside code is none."""
    return CODE_SPAN.sub('', FENCE.sub('', text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # a link in a heading renders as its text
    text = text.strip().lower()
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub('', path.read_text(encoding='utf-8'))):
        s = slug(title)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f'{s}-{n}')
        seen[s] = n + 1
    return out


def links(path: Path) -> list[str]:
    text = prose(path.read_text(encoding='utf-8'))
    return INLINE_LINK.findall(text) + REF_LINK.findall(text)


def is_external(target: str) -> bool:
    return bool(re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target))   # http:, https:, mailto:, ...


def test_slug_follows_github():
    # literals typed from GitHub's rendering of such headings
    assert slug('The fast search path (`Network(fast=True)`, the default of `train_search.py`)') == \
        'the-fast-search-path-networkfasttrue-the-default-of-train_searchpy'
    assert slug("EoiNAS on the NOS space, and with AGS: this repo's own combinations") == \
        'eoinas-on-the-nos-space-and-with-ags-this-repos-own-combinations'
    assert slug('Table 1 -- a [link](x.md)') == 'table-1----a-link'


def test_link_parser_skips_code_and_reads_anchors():
    text = 'see [a](docs/a.md#b-c) and `[not](x.md)`\n```\n[no](y.md)\n```\n[r]: docs/r.md\n'
    found = INLINE_LINK.findall(prose(text)) + REF_LINK.findall(prose(text))
    assert found == ['docs/a.md#b-c', 'docs/r.md']


@pytest.mark.parametrize('page', pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if not target or is_external(target):
            continue
        file_part, _, anchor = target.partition('#')
        dest = (page.parent / file_part).resolve() if file_part else page
        if ROOT != dest and ROOT not in dest.parents:
            bad.append(f'{target}: points outside the repo')
        elif not dest.exists():
            bad.append(f'{target}: no such file {os.path.relpath(dest, ROOT)}')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            bad.append(f'{target}: no heading with anchor #{anchor} in {os.path.relpath(dest, ROOT)}')
    assert not bad, f'{page.relative_to(ROOT)} has broken links:\n' + '\n'.join(bad)


def sources() -> list[Path]:
    """The top-level Python files but this one (whose FORBIDDEN names the pointers)."""
    return [p for p in sorted(ROOT.glob('*.py')) if p.name != Path(__file__).name]


@pytest.mark.parametrize('page', pages() + sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointers_outside_the_clone(page):
    text = page.read_text(encoding='utf-8')
    hits = [f'line {i}: {line.strip()}' for i, line in enumerate(text.splitlines(), 1)
            if any(f in line for f in FORBIDDEN)]
    assert not hits, (f'{page.relative_to(ROOT)} points at material a clone does not have (the specs and notes '
                      f'outside the repo); state the decision or the fact in the repo\'s own words:\n'
                      + '\n'.join(hits))


def test_readme_is_a_front_door():
    lines = (ROOT / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(lines) < README_MAX_LINES, (f'README.md has {len(lines)} lines; keep it under {README_MAX_LINES} '
                                           f'and move details to a page in docs/')


def test_docs_index_lists_every_page():
    index = ROOT / 'docs' / 'README.md'
    listed = {(index.parent / t.partition('#')[0]).resolve() for t in links(index) if not is_external(t)}
    missing = [p.name for p in sorted((ROOT / 'docs').glob('*.md')) if p != index and p.resolve() not in listed]
    assert not missing, f'docs/README.md (the index) does not link to: {", ".join(missing)}'
    readme = {(ROOT / t.partition('#')[0]).resolve() for t in links(ROOT / 'README.md') if not is_external(t)}
    assert index.resolve() in readme, 'README.md does not link to docs/README.md, the index of the docs'


@pytest.mark.parametrize('source', sources(), ids=lambda p: p.name)
def test_code_points_at_docs_that_exist(source):
    """A comment or docstring that says where a decision is stated (docs/PAGE.md) names a page of the clone."""
    named = set(re.findall(r'docs/([\w-]+\.md)', source.read_text(encoding='utf-8')))
    missing = sorted(n for n in named if not (ROOT / 'docs' / n).exists())
    assert not missing, f'{source.name} points at docs pages that do not exist: {missing}'
