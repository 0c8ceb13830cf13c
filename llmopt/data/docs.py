"""Out-of-domain text: Django's documentation (English technical prose with code), from the Django sdist.

The reStructuredText sources under ``docs/`` (release notes and the theme left out) with their markup removed:
section underlines, directives and their options, comments and link targets go; roles and inline literals keep
their text. Code samples stay: they are part of what a technical reader feeds a model.
"""

from __future__ import annotations

import re
import tarfile

from llmopt.data.packages import package_file

DJANGO = "Django==5.1.4"
_SKIPPED = ("/docs/releases/", "/docs/_theme/", "/docs/_ext/", "/docs/man/")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\. ")
_OPTION = re.compile(r"^\s+:[\w -]+:")
_ROLE = re.compile(r":[\w:+.-]+:`~?([^`<]*?)\s*(?:<[^`>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")
_REFERENCE = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`_{1,2}")


def django_docs(min_words: int) -> list[str]:
    """Every documentation page of at least `min_words` words, as plain text, in path order."""
    pages = []
    with tarfile.open(package_file(DJANGO, sdist=True)) as sdist:
        for member in sorted(sdist.getmembers(), key=lambda m: m.name):
            name = member.name
            if "/docs/" not in name or not name.endswith(".txt") or any(s in name for s in _SKIPPED):
                continue
            text = strip_rst(sdist.extractfile(member).read().decode("utf-8"))
            if len(text.split()) >= min_words:
                pages.append(text)
    return pages


def strip_rst(source: str) -> str:
    """Plain text from reStructuredText: underlines, directives (with their option lines), comments and link
    targets dropped; roles, references and literals reduced to their text; blank-line runs collapsed."""
    lines, in_directive = [], False
    for line in source.splitlines():
        if _DIRECTIVE.match(line):
            in_directive = True  # its option lines follow; its indented body (code, notes) is kept
            continue
        if in_directive and _OPTION.match(line):
            continue
        in_directive = False
        if _UNDERLINE.match(line):
            continue
        lines.append(line.rstrip())
    text = _LITERAL.sub(r"\1", _REFERENCE.sub(r"\1", _ROLE.sub(r"\1", "\n".join(lines))))  # may span lines
    return re.sub(r"\n{3,}", "\n\n", text).strip()
