"""Referring phrases: the entity of a turn moves into the image.

`referring_phrase` picks a phrase for an entity type ("the person featured in the image"), and
`replace_entity` puts it in place of the entity so that the turn stays grammatical (``mid_prompt``); a
rephraser (`src.databuilder.rephrase`) then turns ``mid_prompt`` into the final ``question``.

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
import re
from collections.abc import Mapping, Sequence

from src.databuilder.base import BuildError, Entity

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
