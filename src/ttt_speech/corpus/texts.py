"""Long public-domain English texts that Debian packages put on disk, cut into speakable sentences.

Each source names the Debian package that installs it, so a missing text is an error that says
what to install. Sentences are normalised for speech synthesis: ASCII punctuation only, no digits
(an engine would read "1611" as words the transcript does not have), 3-40 words. docs/corpus.md
gives each text's licence.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIN_WORDS, MAX_WORDS = 3, 40
KJV_DATA = Path("/usr/lib/bible.data")  # bible-kjv-text; read through bible-kjv's `bible`
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")  # dict-devil
JARGON_TEXT = Path("/usr/share/doc/jargon-text/jargon.txt.gz")  # jargon-text
_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--", "\u2013": "-"})
_SPEAKABLE = re.compile(r"[A-Za-z][A-Za-z ,.;:!?'\-]*")


class MissingTextError(RuntimeError):
    """A text source is not installed; the message names the package."""


@dataclass(frozen=True)
class Sentence:
    text: str  # as spoken and as transcribed
    paragraph: int  # paragraph index within its source: a longer pause where it changes


@dataclass(frozen=True)
class TextSource:
    name: str
    title: str
    package: str  # the Debian package that provides it
    read: Callable[[], list[str]]  # the raw paragraphs, in reading order

    def sentences(self) -> list[Sentence]:
        """All speakable sentences in reading order; MissingTextError names the package when absent."""
        out = [Sentence(s, i) for i, para in enumerate(self.read()) for s in split_sentences(para)]
        if not out:
            raise MissingTextError(f"{self.title}: no usable text found (reinstall: apt-get install {self.package})")
        return out


def vocabulary(sentences: list[Sentence]) -> list[str]:
    """The distinct words of `sentences`, lower-cased, without punctuation, sorted (a seed picks the same ones)."""
    return sorted({w.lower() for s in sentences for w in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", s.text)})


def _need(path: Path, package: str, title: str) -> Path:
    if not path.exists():
        raise MissingTextError(f"{title}: {path} is missing; install it with `apt-get install {package}`")
    return path


def _blocks(text: str) -> list[str]:
    """Blank-line separated blocks, each joined into one line."""
    return [" ".join(b.split()) for b in re.split(r"\n\s*\n", text) if b.strip()]


def read_kjv() -> list[str]:
    """The King James Bible, one paragraph per chapter, through bible-kjv's `bible` reader (its data is compressed)."""
    exe = shutil.which("bible")
    _need(KJV_DATA, "bible-kjv-text", "King James Bible")
    if exe is None:
        raise MissingTextError("King James Bible: the `bible` reader is missing; install it with "
                               "`apt-get install bible-kjv`")
    out = subprocess.run([exe, "-p", str(KJV_DATA.parent), "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    chapters: list[list[str]] = []
    for line in out.splitlines():
        if re.fullmatch(r"\S.* \d+", line):  # "Genesis 1": a chapter heading
            chapters.append([])
        elif line.strip() and chapters:
            chapters[-1].append(re.sub(r"^\s*\d+ ", "", line))  # drop the verse number
    return [" ".join(" ".join(c).split()) for c in chapters]


def read_devil() -> list[str]:
    """Bierce's Devil's Dictionary from dict-devil's dictd file; "ABSOLUTE, adj.  Text" becomes "Absolute. Text"."""
    path = _need(DEVIL_DICT, "dict-devil", "The Devil's Dictionary")
    text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    text = text[text.find("\nA\n"):] if "\nA\n" in text else text  # skip the dictd headers and preface notice
    paras = []
    for block in _blocks(text):
        m = re.match(r"([A-Z][A-Z' -]+), [a-z.]+\.? +(.*)", block)
        paras.append(f"{m.group(1).title()}. {m.group(2)}" if m else block)
    return paras


def read_jargon() -> list[str]:
    """The Jargon File 4.4.7 from jargon-text's plain-text copy, without its ":headword: n." lines.

    Its table of contents (one or two words a block) is dropped by the sentence filter.
    """
    path = _need(JARGON_TEXT, "jargon-text", "The Jargon File")
    blocks = _blocks(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))
    return [b for b in blocks if not re.match(r":[^:]+:", b)]


SOURCES: dict[str, TextSource] = {
    "kjv": TextSource("kjv", "The King James Bible (1611)", "bible-kjv-text bible-kjv", read_kjv),
    "devil": TextSource("devil", "The Devil's Dictionary, Ambrose Bierce (1911)", "dict-devil", read_devil),
    "jargon": TextSource("jargon", "The Jargon File 4.4.7 (2003)", "jargon-text", read_jargon),
}


def normalize(text: str) -> str:
    """ASCII punctuation, no markup ({links}, _italics_, [notes], quotes), no standalone punctuation."""
    text = re.sub(r"\s*--\s*", ", ", text.translate(_ASCII))
    text = re.sub(r"\[[^\]]*\]|[{}_\"()*]", " ", text)
    words = [w for w in text.split() if re.search(r"[A-Za-z0-9,.;:!?]", w)]  # digits stay, to reject the sentence
    words = [w.title() if len(w) > 2 and w.isupper() else w for w in words]  # LORD, ABSOLUTE: words, not letters
    return re.sub(r"\s+([,.;:!?])", r"\1", " ".join(words)).strip(" ,;:")


def split_sentences(paragraph: str) -> list[str]:
    """Speakable sentences of a paragraph; long ones are cut at ; or : (KJV verses run long)."""
    out = []
    for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", normalize(paragraph)):
        parts = [sent] if len(sent.split()) <= MAX_WORDS else re.split(r"(?<=[;:])\s+", sent)
        for part in parts:
            part = part.strip()
            if part and part[-1] in ",;:":
                part = part[:-1] + "."
            if MIN_WORDS <= len(part.split()) <= MAX_WORDS and _SPEAKABLE.fullmatch(part):
                out.append(part)
    return out


def load_sources(names: list[str]) -> dict[str, list[Sentence]]:
    """Sentences of each named source; ValueError for an unknown name, MissingTextError for an absent one."""
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown text source(s) {unknown}; choose from {sorted(SOURCES)}")
    return {n: SOURCES[n].sentences() for n in names}
