"""Referring phrases and rephrasers: the entity of a turn moves into the image.

`referring_phrase` picks a phrase for an entity type ("the person featured in the image"), `replace_entity`
puts it in place of the entity so that the turn stays grammatical (``mid_prompt``), and a rephraser turns
``mid_prompt`` into the final ``question``: `RuleRephraser` keeps it, `ModelRephraser` has a language model
(an OpenAI-compatible endpoint or a local transformers model) rewrite it fluently and falls back to
``mid_prompt`` when the rewrite is unusable.

Grammar of the replacement (`rewrite_turn`):

- a span that starts or ends inside a word is widened to the whole word ("Mormon" in "Mormonism", "Nyong"
  in "Nyong'o"); a possessive tagged with the name ("Obama's") stays after the phrase;
- a preceding determiner is absorbed, since the phrase brings its own "the": the / a / an / these / those
  and the possessives my / your / his / its / our / their ("the FBI", "a Google", "their Facebook");
- for a person, preceding titles and honorifics are absorbed ("Senator Rand Paul", "former President
  Obama", "Mr. Smith"; words like "judge" or "miss" only when capitalised), an occupation used as a title
  with what qualifies it ("the actress Lupita Nyong'o", "CNN news anchor Kate Bolduan", "my favorite singer
  X"), and a "Jr." suffix; for any type a few premodifiers ("the late", "the infamous");
- a plural MISC entity (a demonym or group: "Americans", "Jews") gets a plural phrase, its head noun made
  "people" ("the people in the image"); adjectives before it move into the phrase ("black Americans" ->
  "the black people in the image"); after a quantifier it becomes "of" + phrase ("many of the people");
- a MISC name of origin or faith used as an adjective before a listed noun (`_NOUNS_OF_ORIGIN`) hands the
  phrase that noun as its head ("Polish people" -> "the people shown in the image", "some Chinese guy" ->
  "the guy in the image");
- the phrase is capitalised at the start of a sentence (start of the turn, after . ! ? or a line break);
- a phrase with words after its head cannot take "'s" ("the person in the image's daughters" reads as the
  image's daughters), so a possessive gets the phrase's prenominal form "the pictured <head>" ("Obama's
  daughters" -> "the pictured person's daughters", "Americans' rights" -> "the pictured people's rights");
  so does a name used as a modifier of a listed noun (`_MODIFIED_NOUNS`: "the FBI headquarters" -> "the
  pictured organization's headquarters"). A custom phrase not of the form "the <head> ..." keeps the group
  genitive ("someone in the image's house").

Not handled (left to the model rephraser): a name modifying a noun not in those lists ("MMA live fights"),
a MISC adjective without a listed noun ("Syrian"), and hyphenated compounds ("pro-Trump").
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from src.databuilder.base import BuildError, Entity, RephraseItem, Rewrite
from src.errors import SettingError
from src.llm.chat_client import ChatClient, ChatRequestError, fill_template, load_template
from src.llm.local_lm import LocalLM
from src.models.device import DTYPE_CHOICES
from src.models.source import path_fingerprint

log = logging.getLogger(__name__)

DEFAULT_PROMPT_FILE = Path(__file__).resolve().parents[2] / "configs" / "rephrase" / "prompts" / "rephrase.txt"

# Phrases in the style of MMSafe-PO's ``replacement`` field; each starts with "the" + a head noun
# (pluralisation swaps that noun for "people").
DEFAULT_PHRASES: dict[str, tuple[str, ...]] = {
    "PER": (
        "the person featured in the image",
        "the individual shown in the image",
        "the person in the image",
        "the person shown in the picture",
        "the individual pictured in the image",
        "the person appearing in the image",
        "the person depicted in the image",
        "the individual in the photo",
    ),
    "ORG": (
        "the organization in the image",
        "the company in the image",
        "the organization shown in the image",
        "the group shown in the image",
        "the institution depicted in the image",
        "the company featured in the image",
        "the organization featured in the picture",
        "the business shown in the image",
    ),
    "LOC": (
        "the place shown in the image",
        "the location in the image",
        "the place in the image",
        "the location depicted in the image",
        "the area shown in the image",
        "the region pictured in the image",
        "the site shown in the picture",
        "the place featured in the image",
    ),
    "MISC": (
        "the item in the image",
        "the object shown in the image",
        "the thing shown in the image",
        "the item depicted in the image",
        "the object in the picture",
        "the subject shown in the image",
        "the thing pictured in the image",
        "the item featured in the image",
    ),
}

# what the model rephraser's prompt calls the replaced entity ({entity_type})
TYPE_WORDS = {
    "PER": "a person",
    "ORG": "an organization",
    "LOC": "a place",
    "MISC": "a thing",
    "PLURAL": "a group of people",
}

_DETERMINERS = frozenset({"the", "a", "an", "these", "those", "my", "your", "his", "its", "our", "their"})
_PREMODIFIERS = frozenset(
    {
        "former",
        "late",
        "current",
        "famous",
        "infamous",
        "notorious",
        "legendary",
        "great",
        "so-called",
        "disgraced",
        "beloved",
        "controversial",
    }
)
# a person's titles and honorifics, in any case ("president Trump")
_TITLES = frozenset(
    {
        *("mr", "mrs", "ms", "mx", "dr", "prof", "professor", "sir", "dame", "lady", "minister", "premier"),
        *("president", "chancellor", "secretary", "ambassador", "senator", "sen", "representative"),
        *("congressman", "congresswoman", "governor", "gov", "mayor", "king", "queen", "prince", "princess"),
        *("emperor", "empress", "duke", "duchess", "sultan", "pope", "rabbi", "imam", "reverend", "pastor"),
        *("bishop", "cardinal", "sheikh", "ayatollah", "colonel", "captain", "lieutenant", "sergeant"),
        *("admiral", "commander", "chairman", "chairwoman", "ceo"),
    }
)
# titles that are also common words ("I miss Obama", "don't judge Obama"): only when capitalised
_CAPITALISED_TITLES = frozenset(
    {"miss", "lord", "vice", "prime", "rep", "speaker", "chief", "justice", "judge", "supreme", "leader", "first"}
    | {"saint", "st", "rev", "general", "gen", "col", "capt", "lt", "sgt", "coach"}
)
# a person's occupation before the name, absorbed only with a determiner before it ("the actress X")
_OCCUPATIONS = frozenset(
    {"actor", "actress", "singer", "rapper", "comedian", "host", "anchor", "journalist", "reporter", "author"}
    | {"writer", "artist", "musician", "player", "athlete", "quarterback", "boxer", "director", "producer"}
    | {"politician", "businessman", "businesswoman", "billionaire", "entrepreneur", "founder", "celebrity", "star"}
    | {"youtuber", "influencer", "dictator"}
)
# adjectives before a plural group, moved into its phrase ("black Americans" -> "the black people in the image")
_GROUP_ADJECTIVES = frozenset(
    {"black", "white", "brown", "young", "old", "elderly", "poor", "rich", "wealthy", "illegal", "undocumented"}
    | {"native", "gay", "lesbian", "trans", "transgender", "conservative", "liberal", "religious", "radical"}
    | {"devout", "orthodox", "modern", "average", "typical", "other", "fellow", "foreign", "local", "female", "male"}
)
_CONTRACTIONS = frozenset({"s", "ll", "re", "ve", "d", "m", "t"})
# titles that may be written with a period ("Mr.", "Sen."); other words ending in one end a sentence
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "mx", "dr", "prof", "sen", "rep", "gov", "st", "gen", "col", "capt", "lt"}
)
_QUANTIFIERS = frozenset(
    {"all", "both", "many", "most", "some", "several", "few", "any", "none", "each", "one", "two", "three"}
)
# s-final MISC names that are not plural groups
_SINGULAR_S = frozenset(
    {"christmas", "xmas", "olympics", "paralympics", "oscars", "grammys", "emmys", "mercedes", "texas", "tennis"}
    | {"jesus", "exodus", "lexus", "news", "physics", "politics", "economics", "mathematics", "atlas"}
)
_PLURAL_HEADS = frozenset({"people", "group", "crowd", "individuals", "persons"})
# words that qualify an occupation used as a title ("news anchor X", "baseball player X")
_OCCUPATION_MODIFIERS = frozenset(
    {"news", "tv", "radio", "talk", "show", "film", "movie", "pop", "rap", "rock", "country", "reality", "porn"}
    | {"baseball", "basketball", "football", "soccer", "tennis", "golf", "hockey", "nba", "nfl", "favorite"}
    | {"favourite"}
)
# nouns an entity name modifies ("the FBI headquarters", "a Google account", "Trump supporters"); the name becomes
# a possessive there. Only nouns that are hardly ever verbs: "Does Google store my data?" must stay a question.
_MODIFIED_NOUNS = frozenset(
    {"headquarters", "office", "offices", "employee", "employees", "worker", "workers", "staff", "member", "members"}
    | {"ceo", "founder", "boss", "owner", "executives", "account", "accounts", "page", "profile", "website", "app"}
    | {"password", "login", "restaurant", "restaurants", "dealership", "factory", "warehouse", "product", "products"}
    | {"phone", "laptop", "car", "cars", "delivery", "driver", "drivers", "customers", "news", "anchor", "reporter"}
    | {"fans", "supporters", "voters", "administration", "government", "army", "military", "soldiers", "citizens"}
    | {"residents", "church", "cult", "logo", "brand", "card", "servers", "database", "building", "stadium", "team"}
    | {"players", "movie", "movies", "song", "songs", "album", "concert", "tickets", "family", "wife", "husband"}
    | {"kids", "children", "daughter", "daughters", "son", "sons", "mansion", "vaccine", "vaccines", "policy"}
    | {"policies", "platform", "ads", "food", "casino", "casinos", "hotel", "hotels", "airport", "hospital", "prison"}
)
# a MISC name used as an adjective of origin or faith before a noun ("Polish people", "a Chinese tourist")
_ADJECTIVE_OF_ORIGIN = re.compile(r"(?:an|ese|ish|ch|al|i)$|^(?:muslim|hindu|buddhist|catholic|sikh)$", re.IGNORECASE)
_NOT_ADJECTIVES = frozenset({"ramadan", "quran", "koran", "taliban", "vatican", "wii"})
# what stands for one item of a group ("some Chinese guy" -> "the guy in the image")
_SINGLE_QUANTIFIERS = frozenset({"some", "any", "every", "each", "one", "another"})
# nouns such an adjective qualifies ("Polish people", "French restaurants"); a list, since what follows a name of
# origin may as well be a verb ("the Maori sold")
_NOUNS_OF_ORIGIN = frozenset(
    {"people", "person", "persons", "men", "man", "women", "woman", "guy", "guys", "girl", "girls", "boy", "boys"}
    | {"kid", "kids", "child", "children", "family", "families", "friend", "friends", "neighbor", "neighbors"}
    | {"neighbour", "neighbours", "immigrant", "immigrants", "refugee", "refugees", "citizen", "citizens"}
    | {"tourist", "tourists", "worker", "workers", "student", "students", "merchant", "merchants", "professor"}
    | {"teacher", "teachers", "doctor", "doctors", "coworker", "coworkers", "wife", "husband", "girlfriend"}
    | {"boyfriend", "soldiers", "leaders", "community", "communities", "names", "food", "restaurant", "restaurants"}
    | {"culture", "language", "music", "accent", "country", "countries", "nation", "nations", "government"}
    | {"americans", "canadians"}
)
# a possessive "'s" ("Kesha's", also the "'s" of "is"/"has": "Trump's going to win" reads right either way)
_POSSESSIVE_S = re.compile(r"['’]s(?!\w)")

# a whole word (letters, inner hyphens, a closing period for "Mr.") right before ``endpos``, then blanks
_PREV_WORD = re.compile(r"(?<![\w.'’-])([A-Za-z]+(?:-[A-Za-z]+)*\.?)[^\S\n]+$")
_NOT_SENTENCE_END = ("e.g.", "i.e.", "vs.")
_OPENERS = " \t\"'“‘([*_"


def referring_phrase(entity_type: str, key: str, variants: Mapping[str, Sequence[str]] | None = None) -> str:
    """The referring phrase for ``entity_type``, chosen from its variants by a stable hash of ``key``.

    ``variants`` overrides the default table (`DEFAULT_PHRASES`) type by type. The choice depends only on
    ``key`` and the variant list, not on the process (no salted ``hash``), so rebuilding gives the same data.
    """
    table = {**DEFAULT_PHRASES, **(variants or {})}
    if entity_type not in table:
        raise BuildError(f"no referring phrases for entity type {entity_type!r}; known: {sorted(table)}")
    options = table[entity_type]
    if isinstance(options, str) or not options or any(not str(p).strip() for p in options):
        raise BuildError(f"referring phrases for {entity_type} must be a non-empty list of non-empty strings")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return " ".join(str(options[int.from_bytes(digest[:8], "big") % len(options)]).split())


def is_plural(entity_type: str, surface: str) -> bool:
    """Whether an entity names a plural group: a MISC name whose last word is an s-plural ("Americans")."""
    words = re.findall(r"[A-Za-z]+", surface)
    if entity_type != "MISC" or not words:
        return False
    last = words[-1]
    return (
        len(last) > 2
        and last.endswith("s")
        and not last.endswith(("ss", "sis"))
        and not last.isupper()
        and last.lower() not in _SINGULAR_S
    )


def pluralize(phrase: str) -> str:
    """``phrase`` about a group: its head noun (the word after "the") becomes "people"."""
    m = re.match(r"(the)\s+(\w+)(.*)", phrase, re.IGNORECASE | re.DOTALL)
    if m is None:
        return phrase
    head = m.group(2).lower()
    if head in _PLURAL_HEADS or (head.endswith("s") and not head.endswith("ss")):
        return phrase
    return f"{m.group(1)} people{m.group(3)}"


def rewrite_turn(text: str, entity: Entity, phrase: str) -> tuple[str, str]:
    """(``text`` with ``entity`` replaced by ``phrase``, the phrase used, before any sentence-start capital).

    The phrase used differs from ``phrase`` for a plural group ("the black people in the image" for "the item
    in the image"), a noun of origin ("the tourist in the image") and a possessive ("the pictured person", before
    its "'s"); record that one as the item's ``replacement``.

    See the module docstring for the grammatical rules. Raises `BuildError` when the entity's offsets do not
    match ``text`` or the phrase is empty.
    """
    if not (0 <= entity.start < entity.end <= len(text)) or text[entity.start : entity.end] != entity.text:
        found = text[entity.start : entity.end] if 0 <= entity.start < entity.end else ""
        raise BuildError(
            f"entity {entity.text!r} does not match its offsets [{entity.start}:{entity.end}] "
            f"(the text there is {found!r})"
        )
    phrase = " ".join(phrase.split())
    if not phrase:
        raise BuildError(f"empty referring phrase for entity {entity.text!r}")
    start, end = entity.start, entity.end
    if (possessive := re.search(r"['’]s?$", entity.text)) is not None and possessive.start() > 0:
        end = entity.start + possessive.start()  # "Obama's" tagged whole: the possessive stays after the phrase
    start, end = _whole_words(text, start, end, person=entity.type == "PER")
    plural = is_plural(entity.type, text[start:end])
    noun = _noun_of_adjective(text, entity.type, text[start:end], end) if not plural else None
    headed = None if noun is None else _with_head(phrase, noun.group(1))
    if headed is not None:  # "Polish people" -> "the people in the image": the noun goes into the phrase
        phrase, end = headed, noun.end()
        word = noun.group(1)
        plural = word in ("people", "men", "women", "children") or (word.endswith("s") and not word.endswith("ss"))
    adjectives: list[str] = []
    if plural:
        phrase = phrase if headed is not None else pluralize(phrase)
        while phrase.lower().startswith("the ") and (m := _PREV_WORD.search(text, 0, start)) is not None:
            if m.group(1).lower() not in _GROUP_ADJECTIVES:
                break
            adjectives.insert(0, m.group(1).lower())
            start = m.start()
        if adjectives:
            phrase = f"{phrase[:3]} {' '.join(adjectives)}{phrase[3:]}"

    start = _absorb_prefix(text, start, person=entity.type == "PER")
    if headed is not None and not plural and (m := _PREV_WORD.search(text, 0, start)) is not None:
        if m.group(1).lower() in _SINGLE_QUANTIFIERS:
            start = m.start()
    before, after = text[:start], text[end:]
    # a phrase with words after its head cannot take "'s" ("the person in the image's house"): the possessive,
    # and a name used as a noun modifier ("the FBI headquarters"), get the phrase's prenominal form
    bare = _bare_possessive(text, entity.start, end)
    next_word = re.match(r"[^\S\n]+([A-Za-z]+)\b", after)
    modifier = headed is None and not plural and next_word is not None and next_word.group(1).lower() in _MODIFIED_NOUNS
    if (bare or modifier or _POSSESSIVE_S.match(after)) and (form := _possessive_form(phrase, adjectives)) is not None:
        phrase = form
        if modifier:
            after = "'s" + after
    shown = phrase
    prev = _PREV_WORD.search(before)
    if plural and prev is not None and (prev.group(1).lower() in _QUANTIFIERS or prev.group(1).isdigit()):
        shown = f"of {phrase}"
    elif _at_sentence_start(before):
        shown = phrase[0].upper() + phrase[1:]
    if bare and not phrase.endswith("s"):
        after = after[0] + "s" + after[1:]
    return before + shown + after, phrase


def replace_entity(text: str, entity: Entity, phrase: str) -> str:
    """``text`` with ``entity`` replaced by ``phrase``, grammatically (see `rewrite_turn`)."""
    return rewrite_turn(text, entity, phrase)[0]


def _possessive_form(phrase: str, adjectives: Sequence[str] = ()) -> str | None:
    """``phrase`` in a form that takes "'s": "the person shown in the image" -> "the pictured person" (the
    ``adjectives`` of a group stay before its head: "the pictured black people"). A phrase that ends with its
    head ("the person") is kept; None for a phrase not of the form "the <head> ..." (a custom one)."""
    words = phrase.split()
    head = 1 + len(adjectives)
    if len(words) <= head or words[0].lower() != "the":
        return None
    if len(words) == head + 1:
        return phrase
    return " ".join([words[0], "pictured", *words[1 : head + 1]])


def _with_head(phrase: str, noun: str) -> str | None:
    """``phrase`` with its head noun (the word after "the") replaced by ``noun``; None if it has no such head."""
    m = re.match(r"(the)\s+\w+(.*)", phrase, re.IGNORECASE | re.DOTALL)
    return None if m is None else f"{m.group(1)} {noun}{m.group(2)}"


def _noun_of_adjective(text: str, entity_type: str, surface: str, end: int) -> re.Match[str] | None:
    """The noun after a MISC name used as an adjective of origin or faith ("Polish people", "a Chinese tourist")."""
    if entity_type != "MISC" or not _ADJECTIVE_OF_ORIGIN.search(surface) or surface.lower() in _NOT_ADJECTIVES:
        return None
    m = re.compile(r"[^\S\n]+([a-z]+)\b").match(text, end)
    return m if m is not None and m.group(1) in _NOUNS_OF_ORIGIN else None


def _whole_words(text: str, start: int, end: int, person: bool) -> tuple[int, int]:
    """The span widened to whole words ("Mormon|ism", "O'|Brien", "Nyong|'o"; not "Obama|'s") and, for a
    person, over a "Jr." / "Sr." suffix."""
    while start > 0 and (
        text[start - 1].isalnum() or (text[start - 1] in "'’" and text[start - 2 : start - 1].isalnum())
    ):
        start -= 1
    while True:
        while end < len(text) and text[end].isalnum():
            end += 1
        tail = re.match(r"['’]([^\W_]+)", text[end:])
        if tail is None or tail.group(1).lower() in _CONTRACTIONS:
            break
        end += tail.end()
    if person:
        if (suffix := re.match(r",?\s*(?:Jr|Sr)\b", text[end:])) is not None:
            end += suffix.end()
        # the suffix's period, unless it also ends the sentence
        if (
            text[end - 2 : end] in ("Jr", "Sr")
            and text[end : end + 1] == "."
            and not re.match(r"\.(\s+[A-Z]|\s*$)", text[end:])
        ):
            end += 1
    return start, end


def _absorb_prefix(text: str, start: int, person: bool) -> int:
    """Where the replaced span starts once titles, premodifiers and a determiner before ``start`` are absorbed."""
    absorbed = pos = start
    occupation = False
    while (m := _PREV_WORD.search(text, 0, pos)) is not None:
        raw, word = m.group(1), m.group(1).lower()
        if word.endswith("."):
            if not (person and word[:-1] in _ABBREVIATIONS):
                break
            absorbed = m.start()
        elif person and (word in _TITLES or (word in _CAPITALISED_TITLES and raw[0].isupper())):
            absorbed = m.start()
        elif word in _PREMODIFIERS:
            absorbed = m.start()
        elif word in _DETERMINERS:
            return m.start()
        elif person and word in _OCCUPATIONS:  # used as a title: "actress Cameron Diaz"
            absorbed, occupation = m.start(), True
        elif person and occupation and (word in _OCCUPATION_MODIFIERS or _is_name_word(text, m)):
            absorbed = m.start()  # what qualifies the occupation: "Fox news anchor", "baseball player"
        else:
            break
        pos = m.start()
    return absorbed


def _is_name_word(text: str, m: re.Match[str]) -> bool:
    """Whether the word ``m`` is a capitalised name inside a sentence ("CNN", "Fox"; not "I", not a first word)."""
    word = m.group(1)
    return len(word) > 1 and word[0].isupper() and not _at_sentence_start(text[: m.start()])


def _at_sentence_start(before: str) -> bool:
    """Whether text following ``before`` starts a sentence (opening quotes and brackets ignored)."""
    stripped = before.rstrip(_OPENERS)
    if not stripped or stripped.endswith("\n"):
        return True
    return stripped.endswith((".", "!", "?")) and not stripped.lower().endswith(_NOT_SENTENCE_END)


def _bare_possessive(text: str, entity_start: int, end: int) -> bool:
    """Whether a lone apostrophe after an s-final word at ``end`` marks a possessive, not a closing quote."""
    mark = text[end : end + 1]
    if mark not in ("'", "’") or text[end + 1 : end + 2].isalnum() or text[end - 1 : end] not in ("s", "S"):
        return False
    before = text[:entity_start]
    opened = "‘" in before if mark == "’" else re.search(r"(?:^|[\s(\[])'(?=\w)", before) is not None
    return not opened


class RuleRephraser:
    """The rule-based turn is the question: ``mid_prompt`` unchanged."""

    def __init__(self, name: str = "rule") -> None:
        self.name = name
        self.fallbacks: Counter[str] = Counter()  # stays empty; there for callers that report every rephraser

    def __repr__(self) -> str:
        return f"RuleRephraser(name={self.name!r})"

    def __call__(self, items: list[RephraseItem]) -> list[Rewrite]:
        return [Rewrite(item.mid_prompt) for item in items]


# labels a model may put before its answer ("Rewritten request:", "Here is the rewritten text:")
_LABEL = re.compile(
    r"^\s*(?:here\s+is\s+|here's\s+)?(?:the\s+)?(?:rewritten|rephrased|revised|rewrite|output|answer)"
    r"(?:\s+(?:text|request|question|turn|version|prompt))?\s*:\s*",
    re.IGNORECASE,
)
# a model declining the task instead of rewriting the request
_REFUSAL = re.compile(
    r"\W*(?:i'?m sorry|i am sorry|sorry, but|i apologi[sz]e|as an ai\b|i (?:can ?not|can't|won't|will not|"
    r"am unable to|'m unable to|am not able to) (?:help|assist|comply|fulfil|provide|rewrite|rephrase|do that|"
    r"create|generate|support))",
    re.IGNORECASE,
)
_QUOTES = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("`", "`"), ("«", "»"))


def clean_reply(reply: str, mid_prompt: str) -> str:
    """The reply without surrounding quotes and "Rewritten:"-style labels the input did not have."""
    text = reply.strip()
    while True:
        label = _LABEL.match(text)
        if label is not None and _LABEL.match(mid_prompt) is None:
            text = text[label.end() :].strip()
            continue
        quoted = next((q for q in _QUOTES if _wrapped(text, *q)), None)
        if quoted is not None and not mid_prompt.strip().startswith(quoted[0]):
            text = text[1:-1].strip()
            continue
        return text


def _wrapped(text: str, left: str, right: str) -> bool:
    """Whether ``text`` is one quotation: opened and closed by the marks, with none inside."""
    inner = text[1:-1]
    return len(text) >= 2 and text[0] == left and text[-1] == right and left not in inner and right not in inner


def _mentions(text: str, name: str, ignore_case: bool = True) -> int:
    flags = re.IGNORECASE if ignore_case else 0
    return len(re.findall(rf"(?<!\w){re.escape(name)}(?!\w)", text, flags))


def check_reply(reply: str | None, item: RephraseItem, max_length_ratio: float = 3.0) -> tuple[str, str | None]:
    """(the question, None) for a usable reply, else (``item.mid_prompt``, the reason it was rejected).

    Rejected: no reply (``request_failed``), an empty one (``empty``), one with control or replacement
    characters (``garbled``), a refusal to rewrite (``refused``), one naming the entity more often than
    ``mid_prompt`` does (``names_entity``: the full name, any case, or a person's last name as written), and
    one longer than ``max_length_ratio`` times ``mid_prompt`` (``too_long``).
    """
    if reply is None:
        return item.mid_prompt, "request_failed"
    text = clean_reply(reply, item.mid_prompt)
    if not text:
        return item.mid_prompt, "empty"
    if "\ufffd" in text or any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in text):
        return item.mid_prompt, "garbled"
    if _REFUSAL.match(text) and not _REFUSAL.match(item.mid_prompt):
        return item.mid_prompt, "refused"
    name = re.sub(r"['’]s?$", "", item.entity.text) or item.entity.text
    names = [(name, True)]
    surname = name.split()[-1] if item.entity.type == "PER" and name.split() else ""
    if len(surname) >= 3 and surname != name:
        names.append((surname, False))
    if any(_mentions(text, n, ic) > _mentions(item.mid_prompt, n, ic) for n, ic in names):
        return item.mid_prompt, "names_entity"
    if len(text) > max_length_ratio * len(item.mid_prompt):
        return item.mid_prompt, "too_long"
    return text, None


class ModelRephraser:
    """Rewrite each ``mid_prompt`` fluently with a language model; unusable rewrites fall back to it.

    Exactly one back end: ``base_url`` (+ ``model``, the served model's name) for an OpenAI-compatible
    chat-completions endpoint, through `ChatClient` (API key from the environment variable ``api_key_env``
    only, retries with back-off, ``max_workers`` requests at a time); or ``path``, a local folder or hub id
    of a transformers causal LM, loaded on first use and run batched with greedy decoding, through the
    tokenizer's chat template when it has one. The prompt comes from ``prompt_file`` with the placeholders
    ``{text}`` (``mid_prompt``), ``{phrase}`` (the referring phrase) and ``{entity_type}`` ("a person",
    "an organization", "a place", "a thing", "a group of people"). The model sees text only.

    A rejected reply (see `check_reply`) gives ``Rewrite(mid_prompt, fallback=<reason>)`` and is counted by
    reason in ``fallbacks`` across calls.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        path: str | None = None,
        prompt_file: str | Path = DEFAULT_PROMPT_FILE,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_workers: int = 4,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_length_ratio: float = 3.0,
        name: str = "model",
    ) -> None:
        if (base_url is None) == (path is None):
            raise BuildError(
                "rephrase: set exactly one of rephrase.base_url (an OpenAI-compatible endpoint) and "
                f"rephrase.path (a local transformers model); got base_url={base_url!r}, path={path!r}"
            )
        if base_url is not None and not model:
            raise BuildError("rephrase.model (the served model's name) is required with rephrase.base_url")
        if max_workers < 1 or batch_size < 1 or max_new_tokens < 1 or max_length_ratio <= 0:
            raise BuildError(
                "rephrase needs max_workers >= 1, batch_size >= 1, max_new_tokens >= 1 and max_length_ratio > 0; "
                f"got {max_workers=}, {batch_size=}, {max_new_tokens=}, {max_length_ratio=}"
            )
        if dtype not in DTYPE_CHOICES:
            raise BuildError(f"rephrase.dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
        self.name = name
        try:
            self.template = load_template(prompt_file, ["{text}", "{phrase}"], "rephrase.prompt_file")
        except (OSError, ValueError) as e:
            raise BuildError(str(e)) from None
        self.client = (
            ChatClient(
                base_url,
                str(model),
                api_key_env=api_key_env,
                timeout_s=timeout_s,
                max_retries=max_retries,
                backoff_s=backoff_s,
                temperature=temperature,
                max_tokens=max_new_tokens,
                owner="rephrase",
                label=f"rephrase {name}",
            )
            if base_url is not None
            else None
        )
        self.path = None if path is None else str(path)
        self.lm = None if path is None else LocalLM(str(path), "rephrase.path", device, dtype, trust_remote_code)
        self.max_workers = int(max_workers)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.max_length_ratio = float(max_length_ratio)
        self.fallbacks: Counter[str] = Counter()
        self._chat = False  # whether prompts go through the tokenizer's chat template

    def __repr__(self) -> str:
        backend = repr(self.client) if self.client is not None else f"path={self.path!r}"
        return f"ModelRephraser(name={self.name!r}, {backend})"

    def fingerprint(self) -> str:
        """What the rewrites depend on beyond the settings: the prompt text and, for ``path``, the model folder."""
        return hashlib.sha256(f"{self.template}\0{path_fingerprint(self.path)}".encode()).hexdigest()[:16]

    def build_prompt(self, item: RephraseItem) -> str:
        """The filled rephrasing prompt for one item."""
        kind = "PLURAL" if is_plural(item.entity.type, item.entity.text) else item.entity.type
        values = {"text": item.mid_prompt, "phrase": item.replacement, "entity_type": TYPE_WORDS.get(kind, "a thing")}
        return fill_template(self.template, values)

    def __call__(self, items: list[RephraseItem]) -> list[Rewrite]:
        """One question per item, in order: the model's, or ``mid_prompt`` with the reason it fell back."""
        if not items:
            return []
        prompts = [self.build_prompt(item) for item in items]
        replies = self._generate(prompts) if self.client is None else self._ask_endpoint(self.client, prompts)
        questions = []
        reasons: Counter[str] = Counter()
        for item, reply in zip(items, replies, strict=True):
            question, reason = check_reply(reply, item, self.max_length_ratio)
            if reason is not None:
                reasons[reason] += 1
            questions.append(Rewrite(question, reason))
        self.fallbacks.update(reasons)
        if reasons:
            log.info(
                "rephrase %s: %d of %d rewrites fell back to mid_prompt %s",
                self.name,
                sum(reasons.values()),
                len(items),
                dict(reasons),
            )
        return questions

    def _ask_endpoint(self, client: ChatClient, prompts: list[str]) -> list[str | None]:
        """Replies from the endpoint, ``None`` for a failed request (logged, key-free)."""

        def ask(prompt: str) -> str | None:
            try:
                return client.complete(prompt)
            except ChatRequestError as e:
                log.warning("rephrase %s: request failed: %s", self.name, e)
                return None

        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(prompts))) as pool:
            return list(pool.map(ask, prompts))

    @property
    def _model(self) -> Any:
        """The local model; None until first use and for an endpoint."""
        return None if self.lm is None else self.lm.model

    @property
    def _tokenizer(self) -> Any:
        return None if self.lm is None else self.lm.tokenizer

    def _load(self, lm: LocalLM) -> None:
        try:
            lm.load()
        except (OSError, SettingError) as e:
            raise BuildError(f"could not load the rephrasing model from rephrase.path={self.path!r}: {e}") from e
        self._chat = bool(getattr(lm.tokenizer, "chat_template", None))
        log.info(
            "rephrase %s: loaded %s on %s (%s, chat template: %s)",
            self.name,
            self.path,
            lm.model.device,
            lm.model.dtype,
            self._chat,
        )

    def _generate(self, prompts: list[str]) -> list[str]:
        """Greedy continuations of the prompts by the local model, decoded without special tokens."""
        lm = self.lm  # set whenever no endpoint is: the constructor takes exactly one back end
        if lm.model is None:
            self._load(lm)
        texts = prompts
        if self._chat:
            chats = [[{"role": "user", "content": p}] for p in prompts]
            texts = [lm.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        # a chat template writes any BOS token itself, so the tokenizer must not add another
        return lm.generate(texts, self.batch_size, self.max_new_tokens, add_special_tokens=not self._chat)
