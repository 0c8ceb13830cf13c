"""Offline English text: ~100 Wikipedia articles and 300 news stories shipped in the gensim wheel, and Django's
documentation (`llmopt.data.docs`) as out-of-domain text.

Each calibration corpus is split by document into calibration and held-out parts that never overlap, so
perplexity is never measured on the text a transform was calibrated on. An out-of-domain corpus is held out
whole: no transform ever sees it, so it shows how a gain on the held-out parts carries over to other text.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import io
import random
import re
import xml.etree.ElementTree as ET
import zipfile
from typing import Literal

from llmopt.data.packages import package_file

GENSIM = "gensim==4.4.0"
_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS = "gensim/test/test_data/lee_background.cor"
CORPORA = ("wikipedia", "news")  # calibration and held-out parts
OUT_OF_DOMAIN = ("docs",)  # held out whole
HELDOUT_FRACTION = 0.2
MIN_WORDS = 150

Part = Literal["calibration", "heldout"]


def corpus_split(name: str, part: Part) -> list[str]:
    """The documents of corpus `name` ("wikipedia", "news" or the out-of-domain "docs") in `part` ("calibration"
    or "heldout")."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"part must be 'calibration' or 'heldout', got {part!r}")
    if name in OUT_OF_DOMAIN:
        if part == "calibration":
            raise ValueError(f"{name!r} is out-of-domain text, held out whole: it has no calibration part "
                             f"(calibration corpora: {', '.join(CORPORA)})")
        return list(load_corpus(name))
    return [doc for doc in load_corpus(name) if is_heldout(doc) == (part == "heldout")]


def is_heldout(document: str) -> bool:
    """A stable, content-addressed split: the same document always lands on the same side."""
    digest = hashlib.sha256(document[:200].encode()).digest()
    return digest[0] < 256 * HELDOUT_FRACTION


def calibration_texts() -> list[str]:
    """The default calibration text: the calibration documents of every corpus, in a fixed shuffled order."""
    texts = [doc for name in CORPORA for doc in corpus_split(name, "calibration")]
    random.Random(0).shuffle(texts)
    return texts


@functools.cache
def load_corpus(name: str) -> tuple[str, ...]:
    """All documents of a packaged corpus, markup removed."""
    if name not in CORPORA + OUT_OF_DOMAIN:
        raise ValueError(f"unknown corpus {name!r}; packaged corpora: {', '.join(CORPORA + OUT_OF_DOMAIN)}")
    if name == "docs":
        from llmopt.data.docs import django_docs

        return tuple(django_docs(MIN_WORDS))
    with zipfile.ZipFile(package_file(GENSIM)) as wheel:
        if name == "news":
            lines = wheel.read(_NEWS).decode("latin-1").splitlines()
            return tuple(line.strip() for line in lines if line.strip())
        xml = bz2.decompress(wheel.read(_WIKI))
    return tuple(_wikipedia_articles(xml))


def _wikipedia_articles(xml: bytes) -> list[str]:
    articles = []
    for _, element in ET.iterparse(io.BytesIO(xml)):
        if not element.tag.endswith("}page"):
            continue
        namespace = element.findtext("{*}ns")
        markup = element.findtext("{*}revision/{*}text") or ""
        element.clear()
        if namespace != "0" or markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = strip_wiki_markup(markup)
        if len(text.split()) >= MIN_WORDS:
            articles.append(text)
    return articles


_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_BACK_MATTER = re.compile(r"^=+\s*(See also|References|Notes|External links|Further reading|Bibliography)\s*=+$", re.I)
_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|\\frac")
_DROPPED_LINKS = ("file:", "image:", "category:", "media:")


def _link_text(match: re.Match) -> str:
    target = match.group(1)
    if target.lower().startswith(_DROPPED_LINKS) or re.match(r"^[a-z\-]{2,12}:", target):
        return ""
    return target.split("|")[-1]


def _replace_until_stable(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        text, count = pattern.subn(repl, text)
        if not count:
            return text


def strip_wiki_markup(markup: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, files and tags removed."""
    text = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    text = re.sub(r"<(math|pre|gallery|timeline)[^>]*>.*?</\1>", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _replace_until_stable(_INNER_TEMPLATE, "", text)
    text = _replace_until_stable(_INNER_TABLE, "", text)
    text = _replace_until_stable(_INNER_LINK, _link_text, text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]?", "", text)
    text = re.sub(r"<[^>]+>", "", html.unescape(text))
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.splitlines():
        if _BACK_MATTER.match(line.strip()):
            break
        line = re.sub(r"^=+\s*(.*?)\s*=+$", r"\1", line.strip())
        line = re.sub(r"^[*#:;]+\s*", "", line)
        # what nesting the patterns cannot undo (a bracket inside a caption) is dropped with its line
        if line and not line.startswith(("{", "|", "!")) and not _LEFTOVER.search(line):
            lines.append(re.sub(r"\s+", " ", line))
    return "\n".join(lines)
