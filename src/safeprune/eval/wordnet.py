"""WordNet for NLTK's METEOR, offline.

NLTK's METEOR needs the WordNet corpus (``nltk_data/corpora/wordnet``), which ``nltk.download`` fetches
from GitHub. Offline, safeprune finds WordNet in this order:

1. ``$SAFEPRUNE_WORDNET`` (a directory holding the WordNet 3.0 database files);
2. NLTK's own search path (``nltk.data.find("corpora/wordnet")``), if a user installed it;
3. safeprune's cache (``$SAFEPRUNE_CACHE`` or ``~/.cache/safeprune``)/``nltk_data/corpora/wordnet``,
   written by ``safeprune setup-wordnet``;
4. Debian/Ubuntu's ``wordnet-base`` package (``/usr/share/wordnet``: ``apt-get install wordnet-base``).

Debian's package ships the database (``data.*``, ``index.*``, ``*.exc``) but not ``lexnames``, which
``WordNetCorpusReader.__init__`` opens. ``lexnames`` is the fixed table of the 45 lexicographer files of
WordNet 3.0 (number, name, syntactic category; documented in lexnames(5WN)). ``setup_wordnet`` copies
the database into an NLTK-layout directory and writes that table, after checking that every
lexicographer-file number used in ``data.*`` is in the table and belongs to the file's part of speech.
When no WordNet is found, METEOR is reported as unavailable with the reason; there is no fallback.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InputError

DEBIAN_DIR = Path("/usr/share/wordnet")
DB_FILES = [
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
]
OPTIONAL_FILES = ["index.sense", "cntlist.rev", "sentidx.vrb", "sents.vrb", "verb.Framestext", "LICENSE"]

# WordNet 3.0 lexicographer files (lexnames(5WN)): number, name, syntactic category (1 n, 2 v, 3 a, 4 r)
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]
_CAT = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def lexnames_text() -> str:
    return "".join(f"{i:02d}\t{n}\t{_CAT[n.split('.')[0]]}\n" for i, n in enumerate(LEXNAMES))


def cache_root() -> Path:
    return Path(os.environ.get("SAFEPRUNE_CACHE") or Path.home() / ".cache" / "safeprune")


def default_target() -> Path:
    return cache_root() / "nltk_data" / "corpora" / "wordnet"


def _check_lexfile_numbers(src: Path) -> None:
    """Every synset line of data.POS has field 2 = a lexicographer-file number; check it is a file of
    that part of speech in the table (adjective files serve 's' satellites too)."""
    for pos in ("adj", "adv", "noun", "verb"):
        f = src / f"data.{pos}"
        seen: set[int] = set()
        with open(f, encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):  # licence header
                    continue
                parts = line.split(" ", 3)
                if len(parts) >= 3:
                    seen.add(int(parts[1]))
        for n in seen:
            if n >= len(LEXNAMES) or not LEXNAMES[n].startswith(pos):
                raise InputError(
                    f"lexicographer file {n:02d} in data.{pos} does not match the WordNet 3.0 "
                    "lexnames table: not a WordNet 3.0 database",
                    src,
                )


def is_wordnet_dir(p: Path) -> bool:
    return p.is_dir() and all((p / f).is_file() for f in DB_FILES) and (p / "lexnames").is_file()


def setup_wordnet(source: str | Path | None = None, target: str | Path | None = None, force: bool = False) -> Path:
    """Build an NLTK-layout WordNet directory from a WordNet 3.0 database directory (default: Debian's
    ``/usr/share/wordnet``); write ``lexnames`` if the source lacks it. Returns the target directory."""
    src = Path(source) if source else DEBIAN_DIR
    dst = Path(target) if target else default_target()
    missing = [f for f in DB_FILES if not (src / f).is_file()]
    if missing:
        hint = " (apt-get install wordnet-base)" if src == DEBIAN_DIR else ""
        raise InputError(f"no WordNet database here{hint}: missing {', '.join(missing[:4])}", src)
    _check_lexfile_numbers(src)
    if is_wordnet_dir(dst) and not force:
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in DB_FILES + OPTIONAL_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, tmp / f)
    if (src / "lexnames").is_file():
        shutil.copyfile(src / "lexnames", tmp / "lexnames")
    else:
        (tmp / "lexnames").write_text(lexnames_text(), encoding="utf-8")
    (tmp / "SAFEPRUNE.txt").write_text(
        f"Built by safeprune setup-wordnet from {src}.\n"
        + (
            "lexnames copied from the source.\n"
            if (src / "lexnames").is_file()
            else "lexnames written from the WordNet 3.0 table in lexnames(5WN) (the source had none).\n"
        ),
        encoding="utf-8",
    )
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def find_wordnet(auto_setup: bool = True) -> tuple[Path | None, str]:
    """(directory, how it was found) or (None, reason it is unavailable)."""
    env = os.environ.get("SAFEPRUNE_WORDNET")
    if env:
        p = Path(env)
        if is_wordnet_dir(p):
            return p, "$SAFEPRUNE_WORDNET"
        if p.is_dir() and all((p / f).is_file() for f in DB_FILES) and auto_setup:
            return setup_wordnet(p), f"built from $SAFEPRUNE_WORDNET={p} (lexnames added)"
        return None, f"$SAFEPRUNE_WORDNET={p} is not a WordNet database directory"
    try:
        import nltk

        for root in nltk.data.path:
            p = Path(root) / "corpora" / "wordnet"
            if is_wordnet_dir(p):
                return p, "nltk_data"
    except ImportError:
        return None, "nltk is not installed (pip install 'safeprune[eval]')"
    t = default_target()
    if is_wordnet_dir(t):
        return t, "safeprune cache (safeprune setup-wordnet)"
    if all((DEBIAN_DIR / f).is_file() for f in DB_FILES):
        if auto_setup:
            try:
                return setup_wordnet(DEBIAN_DIR, t), f"built from {DEBIAN_DIR} (Debian wordnet-base; lexnames added)"
            except (OSError, InputError) as e:
                return None, f"could not build WordNet from {DEBIAN_DIR}: {e}"
        return None, f"{DEBIAN_DIR} found but not set up (run: safeprune setup-wordnet)"
    return None, (
        "WordNet not found: apt-get install wordnet-base (then safeprune setup-wordnet), or set "
        "$SAFEPRUNE_WORDNET to a WordNet 3.0 database directory"
    )


def load_wordnet(path: Path):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # NLTK >= 3.9 only reads corpora under its data path (nltk.pathsec): authorise this directory
    path = Path(path).resolve()
    root = path.parent.parent if path.parent.name == "corpora" else path
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))

    class _WordNet30Reader(WordNetCorpusReader):
        # NLTK maps its own "wordnet" corpus onto the loaded one through index.sense (for Open
        # Multilingual Wordnet data). For a WordNet 3.0 database that map is the identity, and Debian's
        # wordnet-base has no index.sense (it is in wordnet-sense-index), so skip it.
        def map_wn(self, version="wordnet"):
            if self.get_version() == "3.0" and not os.path.isfile(os.path.join(self.root.path, "index.sense")):
                return None
            return super().map_wn(version)

    return _WordNet30Reader(str(path), None)
