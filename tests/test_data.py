import json

import pytest
import torch
from transformers import AutoTokenizer

from llmopt.data.corpora import CORPORA, calibration_texts, corpus_split, strip_wiki_markup
from llmopt.data.docs import strip_rst
from llmopt.data.windows import read_texts, token_windows


@pytest.mark.parametrize("name", CORPORA)
def test_splits_never_overlap_and_are_stable(name):
    calibration, heldout = corpus_split(name, "calibration"), corpus_split(name, "heldout")
    assert len(heldout) >= 15 and len(calibration) >= 3 * len(heldout)
    assert not set(calibration) & set(heldout)
    assert corpus_split(name, "heldout") == heldout


def test_calibration_text_holds_no_heldout_document():
    heldout = {doc for name in CORPORA for doc in corpus_split(name, "heldout")}
    assert not heldout & set(calibration_texts())


def test_wikipedia_is_plain_prose():
    articles = corpus_split("wikipedia", "calibration") + corpus_split("wikipedia", "heldout")
    assert len(articles) >= 90
    text = "\n".join(articles)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "&lt;", "'''", "[http"):
        assert markup not in text, markup
    assert sum(len(a.split()) for a in articles) > 300_000


def test_out_of_domain_docs_are_held_out_whole_and_plain():
    docs = corpus_split("docs", "heldout")
    assert len(docs) >= 200 and sum(len(d.split()) for d in docs) > 400_000
    assert not set(docs) & set(calibration_texts())
    with pytest.raises(ValueError, match="held out whole"):
        corpus_split("docs", "calibration")
    lines = [line for doc in docs for line in doc.splitlines()]
    leftovers = [line for line in lines if line.startswith(".. ") or ":ref:`" in line or ":doc:`" in line]
    assert len(leftovers) < len(lines) / 10_000, leftovers[:5]


def test_strip_rst():
    source = ("==========\nSessions\n==========\n\n.. module:: django.contrib.sessions\n   :synopsis: Sessions.\n\n"
              "Edit the :setting:`MIDDLEWARE` setting, see :doc:`the docs\n</topics/http>` and ``settings.py``.\n"
              "Read `the guide <https://x.org>`_.\n\n.. code-block:: python\n\n    x = 1\n")
    assert strip_rst(source) == ("Sessions\n\nEdit the MIDDLEWARE setting, see the docs and settings.py.\n"
                                 "Read the guide.\n\n    x = 1")


def test_strip_wiki_markup():
    markup = ("{{Infobox|a={{b}}}}'''Paris''' is the [[capital city|capital]] of [[France]].<ref>x</ref>"
              "[[File:P.jpg|thumb|A [[view]]]]\n== History ==\n* Founded [http://x.org early].\n"
              "{| class=t\n| cell\n|}\n== References ==\nlast")
    assert strip_wiki_markup(markup) == "Paris is the capital of France.\nHistory\nFounded early."


@pytest.fixture(scope="module")
def tokenizer():
    from llmopt.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def test_token_windows(tokenizer):
    windows = token_windows(["one two three four five six seven"] * 20, tokenizer, 16, max_windows=5)
    assert windows.shape == (5, 16)
    assert (windows == tokenizer.eos_token_id).any()  # documents are separated
    with pytest.raises(ValueError, match="fewer than one window of 512"):
        token_windows(["too short"], tokenizer, 512)


def test_spread_windows_cover_every_document_not_the_first_one(tokenizer):
    documents = [f"Document {i} says {'word ' * 60}" for i in range(10)]
    every = token_windows(documents, tokenizer, 16)
    first, spread = (token_windows(documents, tokenizer, 16, 5, spread=spread) for spread in (False, True))
    assert torch.equal(first, every[:5])
    assert torch.equal(spread, every[torch.linspace(0, len(every) - 1, 5).round().long()])
    assert "Document 2" not in tokenizer.decode(first.flatten())  # the first windows: the first documents only


def test_read_texts(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "b.txt").write_text("third")
    assert read_texts(tmp_path) == ["third", "first", "second"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match=r"c.jsonl:1: each JSON line needs a 'text' field"):
        read_texts(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.txt")
