"""Rule-based entity recognizer: capitalised runs plus a built-in gazetteer (`FallbackNER`).

Its word lists (gazetteer, first names, titles, stop words, ...) live in wordlists.yaml next to this file, read
once at import.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from src.databuilder.base import ENTITY_TYPES, BuildError, Entity
from src.databuilder.ner.common import APOSTROPHES, LABEL_ALIASES, norm_key


def _words(block: str) -> frozenset[str]:
    return frozenset(block.split())


def _entries(block: str) -> list[str]:
    return [e.strip() for e in block.replace("\n", "|").split("|") if e.strip()]


# loaded relative to this file, so an installed (non-editable) package finds it too
_LISTS = yaml.safe_load(Path(__file__).with_name("wordlists.yaml").read_text(encoding="utf-8"))

_GAZETTEER: dict[str, str] = {}
for _type in ("MISC", "LOC", "ORG", "PER"):  # a name listed twice takes the later type
    _GAZETTEER.update((norm_key(name), _type) for name in _entries(_LISTS["gazetteer"][_type]))

_FIRST_NAMES = _words(_LISTS["first_names"])
_TITLES = _words(_LISTS["titles"])
_DOTTED = _words(_LISTS["dotted"])
_FUNCTION = _words(_LISTS["function_words"])
_OPENERS = _words(_LISTS["openers"])
_ACRONYM_STOP = _words(_LISTS["acronym_stop"])
_ROMAN = re.compile(r"^(?:II|III|IV|VI|VII|VIII|IX|XI|XII)$")
_STRONG_CONNECTORS = _words(_LISTS["strong_connectors"])
_WEAK_CONNECTORS = _words(_LISTS["weak_connectors"])
_ORG_HEADS = _words(_LISTS["org_heads"])
_ORG_SUFFIXES = _words(_LISTS["org_suffixes"])
_LOC_HEADS = _words(_LISTS["loc_heads"])
_LOC_SUFFIXES = _words(_LISTS["loc_suffixes"])
_NOT_NAME = _ORG_HEADS | _ORG_SUFFIXES | _LOC_HEADS | _LOC_SUFFIXES | _words(_LISTS["not_name"])
_AMBIGUOUS = _words(_LISTS["ambiguous"])
_NAME_AFFIX = re.compile(r"(?:[A-Z]\.)+|Jr\.|Sr\.|II|III|IV")  # initials and generation suffixes
_ACRONYM = re.compile(r"^[A-Z]{2,5}$|^[A-Z]+&[A-Z]+$")

_TOKEN = re.compile(r"(?:[A-Za-z]\.){2,}|[^\W_](?:\w|[-'&](?=[^\W_]))*|\S")
_SENTENCE_END = frozenset(".!?\u2026")

_SCORE_LISTED, _SCORE_RULE, _SCORE_CAPITALISED = 1.0, 0.8, 0.5


@dataclass
class _Token:
    text: str  # in the apostrophe-normalised text
    start: int
    end: int
    word: bool
    sentence_start: bool = False
    possessive: bool = False  # a "'s" followed the token (left out of its span); a run ends here
    line_break_before: bool = False

    @property
    def bare(self) -> str:
        return self.text.rstrip(".")


def _name_shaped(token: str) -> bool:
    """A word as in a person's name: "Paul", "McConnell", "O'Brien", "José", an initial "F.", "Jr."."""
    if _NAME_AFFIX.fullmatch(token):
        return True
    return token[0].isupper() and any(c.islower() for c in token) and all(c.isalpha() or c in "-'" for c in token)


def _load_gazetteer(path: str | os.PathLike[str]) -> dict[str, str]:
    """``name -> type`` entries from a TSV (``name<TAB>type`` lines, ``#`` comments) or JSON file.

    JSON may be an object ``{name: type}`` or a list of ``[name, type]`` pairs / ``{"text", "type"}`` objects.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise BuildError(f"ner.gazetteer file {file} not found (a TSV of name<TAB>type lines or a JSON object)")
    raw = file.read_text(encoding="utf-8")
    pairs: list[tuple[str, str, str]] = []  # (name, type, where)
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise BuildError(f"ner.gazetteer {file}: invalid JSON ({e})") from None
        if not isinstance(data, dict | list):
            raise BuildError(f"ner.gazetteer {file}: expected a JSON object or list, got {type(data).__name__}")
        for i, item in enumerate(data.items() if isinstance(data, dict) else data):
            if isinstance(item, dict):
                item = (item.get("text"), item.get("type"))
            if not (isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise BuildError(f"ner.gazetteer {file}: entry {i} is not a (name, type) pair of strings: {item!r}")
            pairs.append((item[0], item[1], f"entry {i}"))
    else:
        for n, row in enumerate(csv.reader(raw.splitlines(), delimiter="\t"), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) != 2:
                raise BuildError(f"ner.gazetteer {file} line {n}: expected name<TAB>type, got {row!r}")
            pairs.append((row[0], row[1], f"line {n}"))
    entries: dict[str, str] = {}
    for name, label, where in pairs:
        kind = label.strip().upper()
        kind = LABEL_ALIASES.get(kind, kind)
        if kind not in ENTITY_TYPES or not norm_key(name):
            raise BuildError(f"ner.gazetteer {file} {where}: need a name and a type in {ENTITY_TYPES}, got {label!r}")
        entries[norm_key(name)] = kind
    return entries


class FallbackNER:
    """Rule-based recognizer: capitalised runs + a built-in gazetteer. Offline, deterministic, weaker.

    Finds runs of capitalised words, joined by "of" / "de" / "&" (and by "and" / "for" inside names headed
    by an organisation word: "Department of Health and Human Services"); leaves out titles ("Senator Rand
    Paul" -> "Rand Paul", a person), a leading "The" and a possessive "'s"; skips pronouns, question
    words, auxiliaries, common imperatives, days and months. A capitalised word alone at a sentence start
    counts only when it is listed (gazetteer, common first name) or an acronym. Types: gazetteer entry,
    else title -> PER, organisation / place words ("... Inc", "University of ...", "Lake ...", "... City"),
    acronym -> ORG, first name or two plain capitalised words -> PER, else MISC. Text in capitals only is
    matched against the gazetteer alone. Scores: 1.0 listed, 0.8 typed by a rule, 0.5 MISC by capitals.

    Not handled: lowercase mentions ("obama"), unknown single names at a sentence start, nested or
    coordinated names ("Bill and Melinda Gates"), title-case text (every capitalised word is taken), and
    types beyond these rules (an unknown company name reads as a person or MISC).

    ``gazetteer``: an optional TSV (``name<TAB>type``) or JSON (``{name: type}``) file of extra entries,
    which take precedence over the built-in ones; a leading "The" of a name is dropped.
    """

    name = "fallback"

    def __init__(self, gazetteer: str | None = None) -> None:
        self.gazetteer_path = gazetteer
        self.gazetteer = dict(_GAZETTEER)
        if gazetteer:
            self.gazetteer.update(_load_gazetteer(gazetteer))
        self._single = {k for k in self.gazetteer if " " not in k}
        self._upper = {
            k.upper(): v
            for k, v in self.gazetteer.items()
            if len(k.replace(".", "")) >= 3 and k.lower() not in _AMBIGUOUS
        }
        self._max_words = max(len(k.split()) for k in self.gazetteer)

    def __repr__(self) -> str:
        return f"FallbackNER(gazetteer={self.gazetteer_path!r}, entries={len(self.gazetteer)})"

    def fingerprint(self) -> str:
        """The gazetteer in use (built-in + the file's entries): editing the file changes the entities."""
        return hashlib.sha256(json.dumps(sorted(self.gazetteer.items())).encode("utf-8")).hexdigest()[:16]

    def __call__(self, texts: list[str]) -> list[list[Entity]]:
        return [self._recognize(text) for text in texts]

    # -- tokens

    def _tokenize(self, norm: str) -> list[_Token]:
        tokens: list[_Token] = []
        at_start = True
        for m in _TOKEN.finditer(norm):
            text, start, end = m.group(), m.start(), m.end()
            if tokens and tokens[-1].end > start:  # the dot taken by "Dr." / an initial
                continue
            word = text[0].isalnum()
            tok = _Token(text, start, end, word, line_break_before=not tokens or "\n" in norm[tokens[-1].end : start])
            if tok.line_break_before:
                at_start = True
            if word:
                if text in _DOTTED and norm[end : end + 1] == ".":  # "Dr." / "St." / "Inc." keep their dot
                    tok.text, tok.end = text + ".", end + 1
                elif re.fullmatch(r"[A-Z]", text) and re.match(r"\.\s+[A-Z]", norm[end:]):  # initial: "John F. Kennedy"
                    tok.text, tok.end = text + ".", end + 1
                elif text[-2:].lower() == "'s" and len(text) > 2 and norm_key(text) not in self.gazetteer:
                    tok.text, tok.end, tok.possessive = text[:-2], end - 2, True
                tok.sentence_start, at_start = at_start, False
            elif text in _SENTENCE_END:
                at_start = True
            tokens.append(tok)
        return tokens

    def _is_candidate(self, tok: _Token) -> bool:
        """Can ``tok`` be part of a name: capitalised (or listed), not a stop word or common abbreviation."""
        if not tok.word:
            return False
        if tok.text in self._single or tok.bare in self._single:
            return True
        low = tok.text.lower()
        stop = _FUNCTION | _OPENERS if tok.sentence_start or tok.text.isupper() else _FUNCTION  # "LIKE Jews"
        if low in stop or low.split("'")[0] in stop or tok.text in _ACRONYM_STOP:
            return False
        if re.fullmatch(r"(?:al|el|bin|de)-[A-Z]\w*", tok.text):  # "al-Assad"
            return True
        return tok.text[0].isupper()

    def _connector(self, tok: _Token) -> bool:
        return tok.text.lower() in _STRONG_CONNECTORS or tok.text.lower() in _WEAK_CONNECTORS or tok.text == "the"

    # -- runs

    def _runs(self, tokens: list[_Token], norm: str) -> list[list[_Token]]:
        """Maximal runs of candidate tokens, allowing 1-2 connectors between them ("Bank of America")."""
        runs: list[list[_Token]] = []
        i = 0
        while i < len(tokens):
            if not self._is_candidate(tokens[i]):
                i += 1
                continue
            run = [tokens[i]]
            i += 1
            while i < len(tokens) and not run[-1].possessive:
                j = i
                while j < len(tokens) and j - i < 2 and self._connector(tokens[j]) and not tokens[j].line_break_before:
                    j += 1
                joined = tokens[i:j]
                if joined and (joined[0].text == "the" or (len(joined) == 2 and joined[0].text in _WEAK_CONNECTORS)):
                    break  # "the" only after "of" / "de" ...: "Lord of the Rings", not "... and the NRA"
                nxt = tokens[j] if j < len(tokens) else None
                if nxt is None or nxt.line_break_before or not (self._is_candidate(nxt) or _ROMAN.match(nxt.text)):
                    break
                run.extend([*joined, nxt])
                i = j + 1
            if i < len(tokens) and tokens[i].text.isdigit() and self._lookup([*run, tokens[i]], norm):
                run.append(tokens[i])  # "World War 2"
                i += 1
            runs.append(run)
        return runs

    def _split(self, run: list[_Token], norm: str) -> list[list[_Token]]:
        """Split a run at "and" / "for" unless it is listed or headed by an organisation word."""
        if norm_key(norm[run[0].start : run[-1].end]) in self.gazetteer or run[0].bare in _ORG_HEADS:
            return [run]
        pieces, cur = [], []
        for tok in run:
            if tok.text.lower() in _WEAK_CONNECTORS:
                pieces.append(cur)
                cur = []
            else:
                cur.append(tok)
        return [p for p in [*pieces, cur] if p]

    # -- entities

    def _lookup(self, toks: list[_Token], norm: str) -> str | None:
        return self.gazetteer.get(norm_key(norm[toks[0].start : toks[-1].end]))

    def _entity(self, piece: list[_Token], norm: str, source: str) -> Entity | None:
        """The entity of one run piece, or None (a title alone, a common word at a sentence start)."""
        listed = self._lookup(piece, norm)
        titled = False
        if listed is None:
            n = 0
            while n < len(piece) and piece[n].bare in _TITLES:
                n += 1
            if n == len(piece):  # a title alone: "the President"
                return None
            if n and piece[n].bare not in _NOT_NAME:  # not "Justice Department"
                piece, titled = piece[n:], True
            while piece and self._connector(piece[0]):  # "King of England" -> "England"
                piece, titled = piece[1:], False
            while piece and self._connector(piece[-1]):
                piece = piece[:-1]
            if not piece:
                return None
            listed = self._lookup(piece, norm)
        first = piece[0]
        if listed is None and len(piece) == 1 and (len(first.bare) < 2 or _NAME_AFFIX.fullmatch(first.text)):
            return None
        if listed is not None and first.sentence_start and len(piece) == 1 and first.bare.lower() in _AMBIGUOUS:
            return None
        if listed is None and not titled and first.sentence_start:
            if len(piece) == 1 and not (first.bare in _FIRST_NAMES or _ACRONYM.match(first.text)):
                return None
            if len(piece) > 1 and first.bare not in _FIRST_NAMES and self._lookup(piece[1:], norm) not in (None, "PER"):
                piece = piece[1:]  # "Visit China" -> "China"
                listed = self._lookup(piece, norm)
        kind, score = self._classify(piece, norm, listed, titled)
        start, end = piece[0].start, piece[-1].end
        return Entity(source[start:end], kind, start, end, score)

    def _classify(self, piece: list[_Token], norm: str, listed: str | None, titled: bool) -> tuple[str, float]:
        if listed is not None:
            return listed, _SCORE_LISTED
        words = [t.bare for t in piece]
        name_shaped = all(_name_shaped(t.text) for t in piece) and not any(w in _NOT_NAME for w in words)
        if titled and name_shaped:
            return "PER", _SCORE_RULE
        if words[-1] in _ORG_SUFFIXES or words[0] in _ORG_HEADS:
            return "ORG", _SCORE_RULE
        if words[0] in _LOC_HEADS or words[-1] in _LOC_SUFFIXES:
            return "LOC", _SCORE_RULE
        if len(piece) == 1 and _ACRONYM.match(piece[0].text):
            return "ORG", _SCORE_RULE
        if len(piece) > 1 and words[-1].endswith("s") and self._lookup(piece[:-1], norm) == "LOC":
            return "ORG", _SCORE_RULE  # a team: "Dallas Cowboys", "New York Giants"
        if name_shaped and (words[0] in _FIRST_NAMES or len(piece) in (2, 3, 4)) and not self._has_listed(piece, norm):
            return "PER", _SCORE_RULE
        return "MISC", _SCORE_CAPITALISED

    def _has_listed(self, piece: list[_Token], norm: str) -> bool:
        """Does ``piece`` start with a listed non-person or hold a listed name of several words ("New York")?

        A listed single word later in the piece is allowed: "Whitney Houston", "Jerry Jones".
        """
        for i in range(len(piece)):
            for j in range(i + 1, len(piece) + 1):
                if (i == 0 or j - i > 1) and self._lookup(piece[i:j], norm) not in (None, "PER"):
                    return True
        return False

    def _shouted(self, norm: str, tokens: list[_Token], source: str) -> list[Entity]:
        """Entities of a text written in capitals: gazetteer names of 3+ letters, any case."""
        found: list[Entity] = []
        words = [t for t in tokens if t.word]
        i = 0
        while i < len(words):
            for n in range(min(self._max_words, len(words) - i), 0, -1):
                seq = words[i : i + n]
                kind = self._upper.get(norm_key(norm[seq[0].start : seq[-1].end]).upper())
                if kind is not None:
                    start, end = seq[0].start, seq[-1].end
                    found.append(Entity(source[start:end], kind, start, end, _SCORE_LISTED))
                    i += n
                    break
            else:
                i += 1
        return found

    def _recognize(self, source: str) -> list[Entity]:
        norm = source.translate(APOSTROPHES)
        tokens = self._tokenize(norm)
        words = [t.text for t in tokens if t.word and any(c.isalpha() for c in t.text)]
        if len(words) >= 3 and sum(w.isupper() for w in words) >= 0.8 * len(words):
            return self._shouted(norm, tokens, source)
        pieces = [piece for run in self._runs(tokens, norm) for piece in self._split(run, norm)]
        return [e for piece in pieces if (e := self._entity(piece, norm, source)) is not None]
