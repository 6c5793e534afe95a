"""Entity recognition for the data builder: find PER / ORG / LOC / MISC spans in the last user turn.

Two recognizers implement `src.databuilder.base.EntityRecognizer`:

* `TransformersNER`: a token-classification model (default ``dslim/bert-base-NER``, the BERT CoNLL-03
  tagger used for modality interpretation in the BPO paper), loaded on first call. The recommended option.
* `FallbackNER`: capitalisation rules plus a small built-in gazetteer; needs no weights and no network, and
  is deterministic. It is the weaker option: it misses lowercase mentions, unknown single names at a
  sentence start and text without a case signal, and its types come from a few suffix / title rules.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.databuilder.base import ENTITY_TYPES, BuildError, Entity
from src.models.source import path_fingerprint

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- shared helpers

# label names of other tag sets mapped to the CoNLL-03 types; value types (dates, numbers) are not names
_LABEL_ALIASES = {
    "PER": "PER",
    "PERS": "PER",
    "PERSON": "PER",
    "ORG": "ORG",
    "ORGANIZATION": "ORG",
    "ORGANISATION": "ORG",
    "LOC": "LOC",
    "LOCATION": "LOC",
    "GPE": "LOC",
    "FAC": "LOC",
    "MISC": "MISC",
    "NORP": "MISC",
}
_VALUE_LABELS = frozenset({"DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"})
_TAGGED_LABEL = re.compile(r"^([BIESLU])[-_](.+)$")
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'"})  # 1:1, offsets kept
_EDGE_CHARS = string.whitespace + string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u2013\u2014"
_KEEP_FINAL_DOT = re.compile(r"(?:^|[\s.])(?:[A-Z]|Jr|Sr|Inc|Co|Corp|Ltd|St|Mt)\.$")


def entity_type(label: str) -> str | None:
    """The entity type of a tag-set type name (``PERSON`` -> PER, ``GPE`` -> LOC), None for value types.

    Unknown names are MISC.
    """
    name = label.strip().upper()
    if name in _VALUE_LABELS:
        return None
    return _LABEL_ALIASES.get(name, "MISC")


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` narrowed past surrounding spaces, punctuation and a possessive "'s".

    The dot of an abbreviation stays: "U.S.", "Jr.".
    """
    while start < end and text[start] in _EDGE_CHARS:
        start += 1
    while start < end and text[end - 1] in _EDGE_CHARS:
        if text[end - 1] == "." and _KEEP_FINAL_DOT.search(text[start:end]):
            break
        end -= 1
    if end - start > 2 and text[end - 2 : end].translate(_APOSTROPHES).lower() == "'s":
        return _strip_span(text, start, end - 2)
    return start, end


def _norm_key(name: str) -> str:
    """Gazetteer key: straight apostrophes, single spaces, no leading "The"."""
    key = " ".join(name.translate(_APOSTROPHES).split())
    return key[4:] if key.startswith("The ") and len(key) > 4 else key


# ------------------------------------------------------------------------------------------------ built-in lists


def _words(block: str) -> frozenset[str]:
    return frozenset(block.split())


def _entries(block: str) -> list[str]:
    return [e.strip() for e in block.replace("\n", "|").split("|") if e.strip()]


_LOC_NAMES = """
Afghanistan|Albania|Algeria|Argentina|Armenia|Australia|Austria|Azerbaijan|Bahamas|Bangladesh|Belarus|Belgium|
Bolivia|Bosnia|Brazil|Bulgaria|Cambodia|Cameroon|Canada|Chile|China|Colombia|Congo|Costa Rica|Croatia|Cuba|
Cyprus|Czech Republic|Czechia|Denmark|Dominican Republic|Ecuador|Egypt|El Salvador|England|Estonia|Ethiopia|Fiji|
Finland|France|Georgia|Germany|Ghana|Greece|Greenland|Guatemala|Haiti|Honduras|Hong Kong|Hungary|Iceland|India|
Indonesia|Iran|Iraq|Ireland|Israel|Italy|Jamaica|Japan|Jordan|Kazakhstan|Kenya|Korea|North Korea|South Korea|
Kosovo|Kuwait|Laos|Latvia|Lebanon|Libya|Lithuania|Luxembourg|Madagascar|Malaysia|Mali|Malta|Mexico|Moldova|
Monaco|Mongolia|Morocco|Mozambique|Myanmar|Nepal|Netherlands|Holland|New Zealand|Nicaragua|Niger|Nigeria|Norway|
Oman|Pakistan|Palestine|Panama|Paraguay|Peru|Philippines|Poland|Portugal|Puerto Rico|Qatar|Romania|Russia|
Rwanda|Saudi Arabia|Scotland|Senegal|Serbia|Singapore|Slovakia|Slovenia|Somalia|South Africa|Spain|Sri Lanka|
Sudan|South Sudan|Sweden|Switzerland|Syria|Taiwan|Tanzania|Thailand|Tibet|Tunisia|Turkey|Uganda|Ukraine|
United Kingdom|United States|United States of America|America|Uruguay|Uzbekistan|Venezuela|Vietnam|Wales|Yemen|
Zambia|Zimbabwe|Great Britain|Britain|United Arab Emirates|UAE|USA|U.S.|U.S.A.|US|UK|U.K.|
Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Hawaii|Idaho|Illinois|Indiana|
Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|Minnesota|Mississippi|Missouri|Montana|
Nebraska|Nevada|New Hampshire|New Jersey|New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|
Pennsylvania|Rhode Island|South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|
West Virginia|Wisconsin|Wyoming|Washington D.C.|Washington DC|D.C.|DC|
New York City|NYC|Los Angeles|LA|Chicago|Houston|Phoenix|Philadelphia|San Antonio|San Diego|Dallas|San Francisco|
Seattle|Boston|Detroit|Miami|Atlanta|Denver|Las Vegas|Portland|New Orleans|Baltimore|Nashville|Austin|Orlando|
Brooklyn|Manhattan|Hollywood|Silicon Valley|London|Paris|Berlin|Madrid|Rome|Moscow|Beijing|Shanghai|Tokyo|
Kyoto|Seoul|Delhi|New Delhi|Mumbai|Bangkok|Dubai|Istanbul|Cairo|Jerusalem|Tel Aviv|Gaza|West Bank|Tehran|
Baghdad|Kabul|Kyiv|Kiev|Sydney|Melbourne|Toronto|Vancouver|Montreal|Mexico City|Rio de Janeiro|Sao Paulo|
Buenos Aires|São Paulo|Amsterdam|Brussels|Vienna|Prague|Dublin|Edinburgh|Athens|Lisbon|Barcelona|Venice|Florence|Munich|
Stockholm|Oslo|Copenhagen|Helsinki|Warsaw|Budapest|Hanoi|Manila|Jakarta|Singapore|Nairobi|Lagos|Havana|Mecca|
Vatican|Crimea|Siberia|Hiroshima|Auschwitz|Chernobyl|Africa|Asia|Europe|Antarctica|Australia|North America|
South America|Latin America|Central America|Middle East|Caribbean|Scandinavia|Arctic|Sahara|Amazon River|
Mississippi River|Atlantic|Pacific|Atlantic Ocean|Pacific Ocean|Indian Ocean|Mediterranean|Mount Everest|
Everest|Grand Canyon|Eiffel Tower|Times Square|Central Park|White House|Pentagon|Kremlin|Wall Street|Alcatraz|
Vegas|SF|Louvre|Capitol|Statue of Liberty|AK|AZ|CA|CT|FL|GA|IL|KS|KY|MN|NC|NH|NJ|NM|NV|NY|SC|TN|TX|VA|VT|WA|WI
"""
_ORG_NAMES = """
Google|Alphabet|Apple|Microsoft|Amazon|Meta|Facebook|Instagram|WhatsApp|Twitter|TikTok|YouTube|Netflix|Tesla|
SpaceX|OpenAI|IBM|Intel|Nvidia|AMD|Samsung|Sony|Nintendo|Toyota|Honda|Ford|General Motors|GM|Volkswagen|BMW|
Mercedes|Boeing|Airbus|Walmart|Target|Costco|McDonald's|Burger King|Starbucks|Coca-Cola|Pepsi|PepsiCo|Nike|
Adidas|Disney|Pixar|Marvel|Warner Bros|Uber|Lyft|Airbnb|eBay|PayPal|Visa|Mastercard|Goldman Sachs|JPMorgan|
Bank of America|Wells Fargo|Citibank|Exxon|ExxonMobil|Shell|BP|Chevron|Pfizer|Moderna|Johnson & Johnson|
Procter & Gamble|AT&T|Verizon|Comcast|Reddit|Wikipedia|Spotify|Snapchat|LinkedIn|Yahoo|Oracle|Huawei|Alibaba|
Tencent|Baidu|IKEA|Home Depot|Kmart|Sears|Subway|KFC|Wendy's|Domino's|Pizza Hut|Taco Bell|Chipotle|FedEx|UPS|
Harvard|Yale|Stanford|Princeton|MIT|Oxford University|Cambridge University|FBI|CIA|NSA|NASA|IRS|DEA|ATF|CDC|FDA|
EPA|FEMA|ICE|TSA|DHS|DOJ|Department of Justice|Justice Department|State Department|Congress|Senate|Supreme Court|
House of Representatives|Pentagon|Secret Service|Homeland Security|United Nations|UN|EU|European Union|NATO|
World Health Organization|General Electric|UNICEF|Red Cross|Amnesty International|Greenpeace|World Bank|IMF|
OPEC|Interpol|KGB|MI6|Mossad|NRA|ACLU|NAACP|Planned Parenthood|Black Lives Matter|BLM|Antifa|Proud Boys|
Ku Klux Klan|KKK|
Taliban|ISIS|Al Qaeda|al-Qaeda|Hamas|Hezbollah|Mafia|Republican Party|Democratic Party|GOP|Labour Party|
Conservative Party|Communist Party|Nazi Party|CNN|Fox News|Fox|MSNBC|BBC|NPR|ABC|CBS|NBC|New York Times|
Washington Post|Wall Street Journal|Reuters|Associated Press|Breitbart|NFL|NBA|MLB|NHL|FIFA|UFC|WWE|NCAA|
Olympic Committee|Catholic Church|Vatican Bank|Salvation Army|Boy Scouts|Girl Scouts|YMCA|Gmail|Hotmail|
OnlyFans|Onlyfans|HBO|Hulu|Twitch|Discord|Venmo|Craigslist|Tinder|Fed|Federal Reserve
"""
_PER_NAMES = """
Obama|Barack Obama|Michelle Obama|Trump|Donald Trump|Biden|Joe Biden|Kamala Harris|Hillary Clinton|Clinton|
Bill Clinton|George Bush|George W. Bush|Bush|Reagan|Ronald Reagan|Nixon|Kennedy|John F. Kennedy|JFK|Lincoln|
Abraham Lincoln|George Washington|Jefferson|Thomas Jefferson|Roosevelt|Franklin Roosevelt|Hitler|Adolf Hitler|
Stalin|Mussolini|Lenin|Mao|Mao Zedong|Putin|Vladimir Putin|Xi Jinping|Kim Jong Un|Zelensky|Netanyahu|Castro|
Fidel Castro|Churchill|Winston Churchill|Gandhi|Mahatma Gandhi|Mandela|Nelson Mandela|Martin Luther King|MLK|
Pelosi|Nancy Pelosi|Bernie Sanders|Sanders|DeSantis|Ron DeSantis|McConnell|Mitch McConnell|Rand Paul|
Elon Musk|Musk|Bezos|Jeff Bezos|Zuckerberg|Mark Zuckerberg|Bill Gates|Steve Jobs|Warren Buffett|Oprah|
Oprah Winfrey|Beyonce|Beyoncé|Kanye|Kanye West|Taylor Swift|Madonna|Elvis|Elvis Presley|Michael Jackson|
Eminem|Drake|Rihanna|Shakespeare|William Shakespeare|Einstein|Albert Einstein|Newton|Isaac Newton|Darwin|
Charles Darwin|Mozart|Beethoven|Picasso|Napoleon|Julius Caesar|Cleopatra|Jesus|Jesus Christ|Muhammad|Moses|
Buddha|Pope Francis|Osama bin Laden|Bin Laden|Saddam Hussein|Epstein|Jeffrey Epstein|Weinstein|Bill Cosby|
Cosby|Charles Manson|Ted Bundy|Tom Cruise|Tom Hanks|Brad Pitt|Angelina Jolie|Kim Kardashian|Joe Rogan|
Tucker Carlson|Alex Jones|Greta Thunberg|Fauci|Anthony Fauci|Snowden|Julian Assange|Assange
"""
_MISC_NAMES = """
American|Americans|British|Brits|English|Englishman|Scottish|Irish|Welsh|French|German|Germans|Italian|Italians|
Spanish|Spaniards|Portuguese|Dutch|Swedish|Swedes|Norwegian|Danish|Finnish|Polish|Poles|Russian|Russians|
Ukrainian|Ukrainians|Greek|Greeks|Turkish|Turks|Chinese|Japanese|Korean|Koreans|Vietnamese|Thai|Filipino|
Filipinos|Indian|Indians|Pakistani|Pakistanis|Afghan|Afghans|Iranian|Iranians|Iraqi|Iraqis|Syrian|Syrians|
Israeli|Israelis|Palestinian|Palestinians|Arab|Arabs|Arabic|Egyptian|Egyptians|Saudi|Saudis|African|Africans|
African American|African Americans|African-American|African-Americans|Nigerian|Nigerians|Ethiopian|Somali|
Kenyan|Mexican|Mexicans|Cuban|Cubans|Brazilian|Brazilians|Argentinian|Colombian|Colombians|Venezuelan|
Canadian|Canadians|Australian|Australians|European|Europeans|Asian|Asians|Latino|Latinos|Latina|Latinas|
Hispanic|Hispanics|Native American|Native Americans|Jew|Jews|Jewish|Muslim|Muslims|Islam|Islamic|Christian|
Christians|Christianity|Catholic|Catholics|Catholicism|Protestant|Protestants|Mormon|Mormons|Hindu|Hindus|
Hinduism|Buddhist|Buddhists|Buddhism|Sikh|Sikhs|Judaism|Scientology|Scientologist|Amish|Nazi|Nazis|Communist|
Communists|Democrat|Democrats|Republican|Republicans|Bible|Quran|Koran|Torah|Christmas|Easter|Thanksgiving|
Halloween|Ramadan|Hanukkah|Passover|Holocaust|World War I|World War II|World War 2|Olympics|Super Bowl|
World War 1|WW1|WW2|WWII|Cold War|Civil War|Lord of the Rings|Star Wars|
Harry Potter|iPhone|iPad|Android|Windows|Xbox|PlayStation|Bitcoin|COVID|Covid|COVID-19|Coronavirus
"""
_GAZETTEER: dict[str, str] = {}
for _type, _block in (("MISC", _MISC_NAMES), ("LOC", _LOC_NAMES), ("ORG", _ORG_NAMES), ("PER", _PER_NAMES)):
    _GAZETTEER.update((_norm_key(name), _type) for name in _entries(_block))

# common first names: a capitalised token starting one of these is a person
_FIRST_NAMES = _words("""
John James Robert Michael David Richard Joseph Thomas Charles Christopher Daniel Matthew Anthony Donald Steven
Paul Andrew Joshua Kenneth Kevin Brian George Timothy Ronald Edward Jason Jeffrey Ryan Jacob Gary Nicholas Eric
Jonathan Stephen Larry Justin Scott Brandon Benjamin Samuel Gregory Alexander Frank Patrick Raymond Jack Dennis
Jerry Tyler Aaron Jose Adam Nathan Henry Douglas Zachary Peter Kyle Noah Ethan Jeremy Walter Christian Keith
Roger Terry Austin Sean Gerald Carl Harold Dylan Arthur Lawrence Jordan Jesse Bryan Billy Bruce Gabriel Joe Logan
Alan Juan Albert Willie Elijah Wayne Randy Vincent Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica
Sarah Karen Lisa Nancy Betty Sandra Margaret Ashley Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah
Stephanie Dorothy Rebecca Sharon Laura Cynthia Amy Kathleen Angela Shirley Brenda Emma Anna Pamela Nicole Samantha
Katherine Christine Helen Debra Rachel Carolyn Janet Maria Catherine Heather Diane Olivia Julie Joyce Victoria Ruth
Virginia Lauren Kelly Christina Joan Evelyn Judith Andrea Hannah Megan Cheryl Jacqueline Martha Madison Teresa
Gloria Sara Janice Ann Kathryn Abigail Sophia Frances Jean Alice Judy Isabella Julia Beverly Denise Marilyn Amber
Danielle Brittany Diana Natalie Sophie Alexis Lori Kayla Jane Mike Bob Tom Jim Steve Dave Chris Matt Tony Dan Sam
Ben Nick Alex Bill Ted Kate Katie Jen Jenny Liz Sue Meg Beth Tim Greg Ron Ken Kim
""")
_TITLES = _words("""
Mr Mrs Ms Miss Mx Dr Prof Professor Sir Dame Lord Lady President Vice Prime Minister Senator Sen Rep
Representative Congressman Congresswoman Governor Gov Mayor Judge Justice Chief General Gen Colonel Col Captain
Capt Lieutenant Lt Sergeant Sgt Officer Detective Pope King Queen Prince Princess Duke Duchess Emperor Empress
Chancellor Secretary Ambassador Rev Reverend Father Pastor Rabbi Imam Sheikh Bishop Cardinal Coach Speaker
Chairman Chairwoman Commissioner Sheriff Admiral Former Late Founder Cofounder Co-founder Director Manager Dean
""")
_DOTTED = _words("Mr Mrs Ms Mx Dr Prof Sen Rep Gov Gen Col Capt Lt Sgt Rev St Mt Ft Jr Sr Inc Co Corp Ltd Ave Rd Blvd")
# never part of a name, capitalised or not: pronouns, determiners, prepositions, auxiliaries, calendar words
_FUNCTION = _words("""
i me my mine myself you your yours yourself he him his himself she her hers herself it its itself we us our ours
they them their theirs themselves this that these those who whom whose what which where when why how whatever
whoever whichever wherever whenever the a an some any all every each either neither no none both few many much
more most other another such own same and or but nor so yet if then than because since while although though
unless until as at by for from in into of off on onto out over under up down to with without within about above
across after against along among around before behind below beneath beside besides between beyond during except
inside near outside past through throughout toward towards upon via is am are was were be been being do does did
done doing have has had having can could would shall should may might must ought don doesn didn isn aren wasn
weren haven hasn hadn won wouldn couldn shouldn cannot ain let here there not mom dad mommy daddy grandma grandpa
sir madam monday tuesday wednesday thursday friday saturday sunday january february march april june july august
september october november december today tomorrow yesterday tonight
""")
# not a name at a sentence start (imperatives, greetings, adverbs); inside a sentence "Google Play", "Will Smith"
_OPENERS = _words("""
will never always also just only even still again ever really very too quite rather maybe perhaps please thanks
thank hi hello hey dear yes yeah yep nope ok okay sure well oh ah um uh hmm wow lol actually basically honestly
anyway however therefore otherwise instead meanwhile moreover furthermore regardless hopefully unfortunately
fortunately apparently obviously seriously literally like tell give show help find explain describe write make
list name compare summarize summarise translate create generate provide suggest recommend teach define calculate
convert choose pick rate rank imagine pretend act play say send get go look read check try buy need want know
think keep stop ignore continue answer respond remember forget draw plan search guess consider assume suppose note
see hear watch call ask talk speak use put take bring start finish great awesome cool right wait
""")
# all-capital abbreviations that are not organisations
_ACRONYM_STOP = _words("""
OK TV AI DIY LOL ASAP CEO CFO CTO DNA RNA IQ GPS PC ID FAQ RIP OMG BTW IMO IMHO FYI USB PDF HIV ATM ADHD PTSD
OCD CPR SUV DVD CD URL UFO BBQ AM PM AD BC TBH IDK LMAO WTF NSFW DM PS HR PR IT VPN SSN HTML CSS API CPU GPU RAM
SSD HDMI LED LCD MD RN ER ICU STD STI UTI BMI MPH KM LB LBS OZ THC CBD LSD MDMA PCP GED SAT GPA MBA BA BS MS CV
ETA VIP POV XL XXL NO YES ASL AKA ETC RSVP SOS CCTV RV ATV MRI EKG IV UV AC LGBT LGBTQ ASMR GIF JPG PNG MP3 MP4
EV SMS GMO
""")
_ROMAN = re.compile(r"^(?:II|III|IV|VI|VII|VIII|IX|XI|XII)$")
_STRONG_CONNECTORS = _words("of de da di du del della van von der den la le bin ibn al el &")
_WEAK_CONNECTORS = _words("and for")  # join only runs headed by an organisation word (or a gazetteer entry)
_ORG_HEADS = _words("""
University Bank Department Ministry Church Institute College Bureau Office Museum Society Association Council
Committee Commission Center Centre Board Federation League Academy School Agency Army Court Union
""")
_ORG_SUFFIXES = _words("""
Inc Corp Corporation Company Co LLC Ltd Limited LLP PLC Group Holdings University College Institute Academy
School Party Foundation Association Society Bank Airlines Airways Motors Church Agency Department Ministry
Council Committee Commission Bureau Administration Authority Board Times Post Journal News Network Records
Studios Pictures Entertainment Media Technologies Technology Systems Labs Laboratories Pharmaceuticals Club
Union Federation League Army Navy Force Corps Police Court Hospital Clinic Museum Restaurant Brands Foods
Industries Enterprises Partners Capital Ventures Insurance Energy Communications Software Magazine Channel Radio
Resources Telecommunications Management Solutions Trust Fund Properties Investments Securities Logistics Consulting
""")
_LOC_HEADS = _words("Mount Mt Lake Fort Ft Cape Port Saint St San Santa Los Las Isle Gulf River City")
_LOC_SUFFIXES = _words("""
City River Lake Mountain Mountains Island Islands Valley County Province Bay Beach Park Street St Avenue Ave
Road Rd Boulevard Blvd Sea Ocean Desert Canyon Falls Hills Heights Springs Square Bridge Tower Airport Coast
Peninsula Gulf Strait Forest Harbor Harbour Village Town Township Creek Glacier Volcano Plains Basin Region
District Territory Station Palace Castle Stadium Arena
""")
# words that make a two-word capitalised run something other than a person's name
_NOT_NAME = (
    _ORG_HEADS
    | _ORG_SUFFIXES
    | _LOC_HEADS
    | _LOC_SUFFIXES
    | _words("""
War Wars Day Cup Bowl Prize Award Awards Games Game Series Act Show Security Festival Revolution Movement Empire
Dynasty Age Era World Star Card Care Health Service Services Online Pro Plus Max Mini Edition Movie Film Book
State States North South East West Northern Southern Eastern Western Central Global International National
""")
)
# listed names that are also common words: not taken alone at a sentence start, nor in text written in capitals
_AMBIGUOUS = _words("""
apple amazon target shell fox visa meta subway ice ups windows android turkey chad
""")
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
        kind = _LABEL_ALIASES.get(kind, kind)
        if kind not in ENTITY_TYPES or not _norm_key(name):
            raise BuildError(f"ner.gazetteer {file} {where}: need a name and a type in {ENTITY_TYPES}, got {label!r}")
        entries[_norm_key(name)] = kind
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
                elif text[-2:].lower() == "'s" and len(text) > 2 and _norm_key(text) not in self.gazetteer:
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
        if _norm_key(norm[run[0].start : run[-1].end]) in self.gazetteer or run[0].bare in _ORG_HEADS:
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
        return self.gazetteer.get(_norm_key(norm[toks[0].start : toks[-1].end]))

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
                kind = self._upper.get(_norm_key(norm[seq[0].start : seq[-1].end]).upper())
                if kind is not None:
                    start, end = seq[0].start, seq[-1].end
                    found.append(Entity(source[start:end], kind, start, end, _SCORE_LISTED))
                    i += n
                    break
            else:
                i += 1
        return found

    def _recognize(self, source: str) -> list[Entity]:
        norm = source.translate(_APOSTROPHES)
        tokens = self._tokenize(norm)
        words = [t.text for t in tokens if t.word and any(c.isalpha() for c in t.text)]
        if len(words) >= 3 and sum(w.isupper() for w in words) >= 0.8 * len(words):
            return self._shouted(norm, tokens, source)
        pieces = [piece for run in self._runs(tokens, norm) for piece in self._split(run, norm)]
        return [e for piece in pieces if (e := self._entity(piece, norm, source)) is not None]


# ------------------------------------------------------------------------------------------ transformers model


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


class TransformersNER:
    """Token-classification model through transformers (default ``dslim/bert-base-NER``), loaded on first call.

    Words take the label of their first sub-token; B-/I- (or BIOES) runs of one type make an entity whose
    score is the mean of its words' label probabilities. Spans are exact character offsets into the input
    (surrounding spaces / punctuation left out); entities under ``min_score`` are dropped. Label names are
    mapped to PER / ORG / LOC / MISC (``PERSON`` -> PER, ``GPE`` -> LOC, unknown -> MISC, dates and numbers
    dropped). Long texts are read in overlapping windows of the model's length.

    ``model``: a hub id or a local folder; ``local_files_only=None`` follows ``HF_HUB_OFFLINE``.
    """

    name = "transformers"

    def __init__(
        self,
        model: str = "dslim/bert-base-NER",
        revision: str | None = None,
        batch_size: int = 32,
        min_score: float = 0.5,
        device: str = "cpu",
        trust_remote_code: bool = False,
        local_files_only: bool | None = None,
    ) -> None:
        if batch_size < 1 or not 0.0 <= min_score <= 1.0:
            raise BuildError(f"ner.batch_size must be >= 1 and ner.min_score in [0, 1], got {batch_size}, {min_score}")
        self.model = str(model)
        self.revision = revision
        self.batch_size = int(batch_size)
        self.min_score = float(min_score)
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.local_files_only = local_files_only
        self._model: Any = None
        self._tokenizer: Any = None
        self._types: dict[int, tuple[str | None, str | None]] = {}  # label id -> (tag B/I/E/S/L/U or None, type)
        self._max_length = 512

    def __repr__(self) -> str:
        return f"TransformersNER(model={self.model!r}, device={self.device!r}, min_score={self.min_score})"

    def fingerprint(self) -> str | None:
        """The model's files (names, sizes, times): a local folder, or a hub id's snapshot in the hub cache."""
        path = os.path.expanduser(self.model)
        if not os.path.isdir(path):
            from huggingface_hub import try_to_load_from_cache

            try:
                found = try_to_load_from_cache(self.model, "config.json", revision=self.revision)
            except ValueError:  # not a valid hub id: loading names the problem
                found = None
            path = os.path.dirname(found) if isinstance(found, str) else None
        return path_fingerprint(path)

    def _load(self) -> None:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        offline = _hub_offline() if self.local_files_only is None else bool(self.local_files_only)
        path = os.path.expanduser(self.model)
        if (os.path.isabs(path) or path.startswith(".") or path.count("/") > 1) and not os.path.isdir(path):
            raise BuildError(
                f"NER model folder {self.model!r} not found; set ner.model=<local path> to a folder with a "
                "token-classification model, or use ner=fallback"
            )
        kwargs: dict[str, Any] = {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "local_files_only": offline,
        }
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            # adapter_kwargs: transformers looks for a PEFT adapter on the hub even when local_files_only is set
            model = AutoModelForTokenClassification.from_pretrained(
                path, adapter_kwargs={"local_files_only": offline}, **kwargs
            )
        except (OSError, ValueError, KeyError) as e:
            mode = "offline (HF_HUB_OFFLINE / ner.local_files_only): only local folders and the hub cache are read"
            raise BuildError(
                f"could not load the NER model {self.model!r}: {e}\n"
                f"{mode if offline else 'online: the hub is reached for ids not in the cache'}. "
                "Set ner.model=<local path> to a downloaded token-classification model, or use ner=fallback "
                "(rule-based, no weights)."
            ) from e
        if not getattr(tokenizer, "is_fast", False):
            raise BuildError(f"NER model {self.model!r} has no fast tokenizer (tokenizer.json); offsets need one")
        types: dict[int, tuple[str | None, str | None]] = {}
        for idx, label in model.config.id2label.items():
            label = str(label)
            m = _TAGGED_LABEL.match(label)
            tag, name = (m.group(1), m.group(2)) if m else (None, label)
            types[int(idx)] = (tag, None if label.upper() == "O" else entity_type(name))
        if all(_GENERIC_LABEL.match(str(lab)) for lab in model.config.id2label.values()):
            raise BuildError(
                f"NER model {self.model!r} has no entity labels (id2label={model.config.id2label}); "
                "it is not a trained token-classification (NER) model"
            )
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self._max_length = min([int(x) for x in limits if isinstance(x, int) and 8 <= x < 100_000] or [512])
        self._types = types
        self._tokenizer = tokenizer
        self._model = model.to(self.device).eval()
        log.info("ner: loaded %s on %s (%d labels)", self.model, self.device, len(types))

    def __call__(self, texts: list[str]) -> list[list[Entity]]:
        if not texts:
            return []
        if self._model is None:
            self._load()
        out: list[list[Entity]] = []
        for i in range(0, len(texts), self.batch_size):
            out.extend(self._batch(texts[i : i + self.batch_size]))
        return out

    def _batch(self, texts: list[str]) -> list[list[Entity]]:
        """Entities of a batch: word labels from each window, then BIO runs per text."""
        import torch

        enc = self._tokenizer(
            texts,
            return_offsets_mapping=True,
            return_overflowing_tokens=True,
            truncation=True,
            max_length=self._max_length,
            stride=self._max_length // 4,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            inputs = {
                k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            probs = self._model(**inputs).logits.float().softmax(-1).cpu()
        best_p, best_id = (t.tolist() for t in probs.max(-1))
        offsets = enc["offset_mapping"].tolist()
        # per text and word index: the word's character span, and per window (start of the word's first
        # token there, label id, probability); a word cut at a window's edge starts later in that window
        spans: list[dict[int, tuple[int, int]]] = [{} for _ in texts]
        votes: list[dict[int, list[tuple[int, int, float]]]] = [{} for _ in texts]
        for row, owner in enumerate(enc["overflow_to_sample_mapping"].tolist()):
            word_ids = enc.word_ids(row)
            for pos, word_id in enumerate(word_ids):
                if word_id is None:
                    continue
                start, end = offsets[row][pos]
                old = spans[owner].get(word_id, (start, end))
                spans[owner][word_id] = (min(old[0], start), max(old[1], end))
                if pos == 0 or word_ids[pos - 1] != word_id:
                    votes[owner].setdefault(word_id, []).append((start, best_id[row][pos], best_p[row][pos]))
        out = []
        for k, text in enumerate(texts):
            words = []
            for word_id in sorted(spans[k]):
                start, end = spans[k][word_id]
                whole = [v for v in votes[k][word_id] if v[0] == start]  # windows that hold the word's start
                _, label_id, score = max(whole, key=lambda v: v[2])
                words.append((start, end, label_id, score))
            out.append(self._entities(text, words))
        return out

    def _entities(self, text: str, words: list[tuple[int, int, int, float]]) -> list[Entity]:
        """BIO(ES) runs of ``(start, end, label id, score)`` words as entities, above ``min_score``."""
        groups: list[tuple[str, int, int, list[float]]] = []  # (type, start, end, word scores)
        open_group = False
        for start, end, label_id, score in words:
            tag, kind = self._types[label_id]
            if kind is None:
                open_group = False
                continue
            if open_group and tag not in ("B", "S", "U") and groups[-1][0] == kind:
                groups[-1] = (kind, groups[-1][1], end, [*groups[-1][3], score])
            else:
                groups.append((kind, start, end, [score]))
            open_group = tag not in ("E", "L", "S", "U")
        found: list[Entity] = []
        for kind, start, end, scores in groups:
            start, end = _strip_span(text, start, end)
            score = sum(scores) / len(scores)
            if start < end and score >= self.min_score:
                found.append(Entity(text[start:end], kind, start, end, score))
        return found
