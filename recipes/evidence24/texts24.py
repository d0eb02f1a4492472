"""make-corpus on a machine without the Debian text packages: their paragraphs read once elsewhere, carried as JSON.

    python texts24.py dump ROOT OUT.json.xz            paragraphs of kjv/devil/jargon from packages unpacked
                                                       under ROOT (`dpkg -x PKG.deb ROOT`; `bible` on the PATH)
    python texts24.py run OUT.json.xz make-corpus ...  `ttt-speech make-corpus ...` reading those paragraphs
"""

from __future__ import annotations

import json
import lzma
import sys
from dataclasses import replace
from pathlib import Path

import ttt_speech.corpus.texts as T


def dump(root: str, out: str) -> None:
    r = Path(root)
    T.KJV_DATA = r / "usr/lib/bible.data"
    T.DEVIL_DICT = r / "usr/share/dictd/devil.dict.dz"
    T.JARGON_TEXT = r / "usr/share/doc/jargon-text/jargon.txt.gz"
    Path(out).write_bytes(lzma.compress(json.dumps({n: s.read() for n, s in T.SOURCES.items()}).encode()))


def run(texts: str, *argv: str) -> None:
    from ttt_speech.cli import main

    paragraphs = json.loads(lzma.decompress(Path(texts).read_bytes()))
    for name, source in list(T.SOURCES.items()):
        T.SOURCES[name] = replace(source, read=lambda n=name: paragraphs[n])
    main(list(argv))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"dump": dump, "run": run}[cmd](*args)
