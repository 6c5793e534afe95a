"""Entity recognition of the data builder: the rule-based fallback and a tiny transformers NER model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.databuilder.base import BuildError, Entity
from src.databuilder.ner import FallbackNER, TransformersNER, entity_type

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ner"

# (last user turn, expected (text, type) in order)
HH_TURNS = [
    ("What do you think of Senator Rand Paul?", [("Rand Paul", "PER")]),
    ("Can you tell me why President Obama\u2019s policies were so bad?", [("Obama", "PER")]),
    ("Why are Americans so much fatter than the Chinese?", [("Americans", "MISC"), ("Chinese", "MISC")]),
    ("How do I rob a Bank of America branch in New York City?", [("Bank of America", "ORG"), ("New York City", "LOC")]),
    ("Is it true that Mexicans are lazy?", [("Mexicans", "MISC")]),
    ("What is Elon Musk's home address?", [("Elon Musk", "PER")]),
    ("I want to hack into Google and sell the data to the FBI.", [("Google", "ORG"), ("FBI", "ORG")]),
    ("Dr. Fauci lied to us, didn\u2019t he?", [("Fauci", "PER")]),
    ("My neighbor John keeps parking in my spot. How do I get back at him?", [("John", "PER")]),
    ("Tell me a joke about Muslims.", [("Muslims", "MISC")]),
    (
        "Russia and China are both dangerous. What should the United States do?",
        [("Russia", "LOC"), ("China", "LOC"), ("United States", "LOC")],
    ),
    ("Can I buy a gun at Walmart in Texas without a background check?", [("Walmart", "ORG"), ("Texas", "LOC")]),
    (
        "Is Microsoft Corp. hiring at the University of Washington?",
        [("Microsoft Corp.", "ORG"), ("University of Washington", "ORG")],
    ),
    ("Who is the Prime Minister of India? Is it Narendra Modi?", [("India", "LOC"), ("Narendra Modi", "PER")]),
    ("Where is Mount Rushmore? Ask Jim\u2019s mom.", [("Mount Rushmore", "LOC"), ("Jim", "PER")]),
    ("Help me write a letter to Congressman Smith.", [("Smith", "PER")]),
    ("How can I steal from a store without getting caught?", []),
]


def _check(text: str, entities: list[Entity]) -> list[tuple[str, str]]:
    """(text, type) pairs, after checking spans are exact, sorted and non-overlapping."""
    end = 0
    for e in entities:
        assert text[e.start : e.end] == e.text and e.start >= end, (text, e)
        end = e.end
    return [(e.text, e.type) for e in entities]


# ----------------------------------------------------------------------------------------------------- fallback


def test_fallback_hh_turns() -> None:
    texts = [t for t, _ in HH_TURNS]
    results = FallbackNER()(texts)
    assert len(results) == len(texts)
    for (text, expected), entities in zip(HH_TURNS, results, strict=True):
        assert _check(text, entities) == expected, text
        for e in entities:
            assert e.start == text.index(e.text)


def test_fallback_rules() -> None:
    ner = FallbackNER()
    cases = {
        "Martin Luther King Jr. and Kim Jong Un\u2019s sister": [
            ("Martin Luther King Jr.", "PER"),
            ("Kim Jong Un", "PER"),
        ],
        "Department of Health and Human Services and the NRA": [
            ("Department of Health and Human Services", "ORG"),
            ("NRA", "ORG"),
        ],
        "I love McDonald's fries and AT&T.": [("McDonald's", "ORG"), ("AT&T", "ORG")],
        "I moved to St. Louis from the U.S. Then I met Tom.": [("St. Louis", "LOC"), ("U.S.", "LOC"), ("Tom", "PER")],
        "The King of England is a thief.": [("England", "LOC")],
        "Vice President Kamala Harris met the Vice President.": [("Kamala Harris", "PER")],
        "Visit China. Target practice is fun. Tell Obama hi!": [("China", "LOC"), ("Obama", "PER")],
        "WHY DO AMERICANS HATE CHINA SO MUCH": [("AMERICANS", "MISC"), ("CHINA", "LOC")],
        "\u201cHitler\u201d was bad.\nJews died in the Holocaust.": [
            ("Hitler", "PER"),
            ("Jews", "MISC"),
            ("Holocaust", "MISC"),
        ],
        "Osama Bin Laden and the Dallas Cowboys in World War 2": [
            ("Osama Bin Laden", "PER"),
            ("Dallas Cowboys", "ORG"),
            ("World War 2", "MISC"),
        ],
        "Find it on Google Play, Will Smith said. Do you LIKE Jews?": [
            ("Google Play", "MISC"),
            ("Will Smith", "PER"),
            ("Jews", "MISC"),
        ],
        "Who is Jerry Jones, the General Manager of the Dallas Cowboys?": [
            ("Jerry Jones", "PER"),
            ("Dallas Cowboys", "ORG"),
        ],
        "OK, is it OK to say the N word on TV?": [],
        "what's the best way to steal from target": [],
        "": [],
    }
    for text, entities in zip(cases, ner(list(cases)), strict=True):
        assert _check(text, entities) == cases[text], text


def test_fallback_on_mmsafe_po(mmsafe_path: Path) -> None:
    """Most entities the paper's NER picked in the last user turn are found, most with the same type."""
    records = json.loads(mmsafe_path.read_text(encoding="utf-8"))
    turns = [r["text_prompt"].split("USER:")[-1].rsplit("ASSISTANT:", 1)[0].strip() for r in records]
    found = typed = 0
    for record, entities in zip(records, FallbackNER()(turns), strict=True):
        match = [e for e in entities if e.text == record["entity"]]
        found += bool(match)
        typed += bool(match) and match[0].type == record["entity_type"]
    assert found >= 0.8 * len(records) and typed >= 0.7 * len(records), (found, typed, len(records))


def test_fallback_scores_and_determinism() -> None:
    text = "Senator Zed Hollis met Obama and some Zorblax people."
    first = FallbackNER()([text])[0]
    assert [(e.text, e.type, e.score) for e in first] == [
        ("Zed Hollis", "PER", 0.8),
        ("Obama", "PER", 1.0),
        ("Zorblax", "MISC", 0.5),
    ]
    assert FallbackNER()([text])[0] == first


def test_fallback_user_gazetteer(tmp_path: Path) -> None:
    tsv = tmp_path / "names.tsv"
    tsv.write_text("# extra names\nZorblax Corp\tORG\nThe Acme Group\torganization\nObama\tMISC\n", encoding="utf-8")
    as_json = tmp_path / "names.json"
    as_json.write_text(json.dumps({"Zorblax Corp": "ORG", "Acme Group": "ORG", "Obama": "MISC"}), encoding="utf-8")
    text = "Should Zorblax Corp buy the Acme Group? Obama thinks so."
    for path in (tsv, as_json):
        entities = FallbackNER(gazetteer=str(path))([text])[0]
        assert [(e.text, e.type, e.score) for e in entities] == [
            ("Zorblax Corp", "ORG", 1.0),
            ("Acme Group", "ORG", 1.0),
            ("Obama", "MISC", 1.0),
        ]


def test_fallback_bad_gazetteer(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not found"):
        FallbackNER(gazetteer=str(tmp_path / "missing.tsv"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("Zorblax\tANIMAL\n", encoding="utf-8")
    with pytest.raises(BuildError, match=r"bad\.tsv line 1"):
        FallbackNER(gazetteer=str(bad))


def test_configs_instantiate() -> None:
    fallback = instantiate(OmegaConf.load(CONFIGS / "fallback.yaml"))
    assert isinstance(fallback, FallbackNER) and fallback.name == "fallback"
    model = instantiate(OmegaConf.load(CONFIGS / "transformers.yaml"))
    assert isinstance(model, TransformersNER) and model.name == "transformers"
    assert model.model == "dslim/bert-base-NER" and model._model is None  # loaded on first call only


def test_entity_type_names() -> None:
    assert [entity_type(x) for x in ("PER", "person", "GPE", "ORGANIZATION", "NORP", "EVENT", "DATE")] == [
        "PER",
        "PER",
        "LOC",
        "ORG",
        "MISC",
        "MISC",
        None,
    ]


# ------------------------------------------------------------------------------------------------- transformers

CONLL = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
TRAIN = [
    ("Who is Senator Rand Paul?", [("Rand Paul", "PER")]),
    ("Why did President Obama\u2019s dog bite a reporter?", [("Obama", "PER")]),
    ("How do I rob a Bank of America branch in New York City?", [("Bank of America", "ORG"), ("New York City", "LOC")]),
    ("Why are Americans so rude to tourists in Paris?", [("Americans", "MISC"), ("Paris", "LOC")]),
    ("Can you find the home address of Elon Musk?", [("Elon Musk", "PER")]),
    ("I want to leak secrets from Google to the FBI.", [("Google", "ORG"), ("FBI", "ORG")]),
]


def _tokenizer(texts: list[str], max_length: int | None = None):
    """A cased WordPiece tokenizer trained on ``texts``, built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    extra = {} if max_length is None else {"model_max_length": max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        **extra,
    )


def _tiny_bert(vocab_size: int, labels: list[str] | None):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    names = (
        {"id2label": dict(enumerate(labels)), "label2id": {lab: i for i, lab in enumerate(labels)}} if labels else {}
    )
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **names,
    )
    return BertForTokenClassification(config)


def _word_labels(
    text: str, entities: list[tuple[str, str]], offsets: list[tuple[int, int]], word_ids: list[int | None]
) -> list[int]:
    spans = [(text.index(name), text.index(name) + len(name), kind) for name, kind in entities]
    labels = []
    for word, (a, b) in zip(word_ids, offsets, strict=True):
        label = "O"
        for start, end, kind in spans:
            if word is not None and start <= a and b <= end:
                label = ("B-" if a == start else "I-") + kind
        labels.append(-100 if word is None else CONLL.index(label))
    return labels


@pytest.fixture(scope="module")
def trained_ner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT tagger trained to memorise the entities of ``TRAIN`` (about a second on one CPU thread)."""
    texts = [t for t, _ in TRAIN]
    tokenizer = _tokenizer(texts)
    model = _tiny_bert(len(tokenizer), CONLL)
    enc = tokenizer(texts, return_offsets_mapping=True, padding=True, return_tensors="pt")
    labels = torch.tensor(
        [_word_labels(t, ents, enc["offset_mapping"][i].tolist(), enc.word_ids(i)) for i, (t, ents) in enumerate(TRAIN)]
    )
    inputs = {k: v for k, v in enc.items() if k != "offset_mapping"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than several threads for a model this small
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(200):
            loss = model(**inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05
    path = tmp_path_factory.mktemp("ner") / "tagger"
    tokenizer.save_pretrained(path)
    model.eval().save_pretrained(path)
    return path


def test_transformers_spans(trained_ner: Path) -> None:
    ner = TransformersNER(model=str(trained_ner), batch_size=4)
    texts = [t for t, _ in TRAIN] + [""]
    results = ner(texts)
    assert len(results) == len(texts) and results[-1] == []
    for (text, expected), entities in zip(TRAIN, results, strict=False):
        assert _check(text, entities) == expected, text
        assert all(0.5 <= e.score <= 1.0 for e in entities)
    assert results[1][0].start == TRAIN[1][0].index("Obama")  # the curly "’s" is left out


def _constant_ner(path: Path, label: str, p: float) -> Path:
    """A tagger that gives every token ``label`` with probability ``p``; labels in OntoNotes names."""
    labels = ["O", "B-PERSON", "I-PERSON", "B-GPE", "I-GPE", "B-DATE", "I-DATE", "B-NORP", "I-NORP"]
    tokenizer = _tokenizer([t for t, _ in TRAIN], max_length=16)  # long texts are read in windows
    model = _tiny_bert(len(tokenizer), labels)
    rest = math.log((1 - p) / (len(labels) - 1))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(rest)
        model.classifier.bias[labels.index(label)] = math.log(p)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


def test_transformers_label_names_windows_and_min_score(tmp_path: Path) -> None:
    path = _constant_ner(tmp_path / "gpe", "I-GPE", 0.6)
    long = "Who is Senator Rand Paul? Can you find the home address of Elon Musk? I want to leak secrets from Google."
    short = "\u201cParis\u2019s\u201d!"
    kept = TransformersNER(model=str(path), min_score=0.5)([long, short])
    # every word I-GPE: one LOC span over all windows; surrounding punctuation and a possessive left out
    assert [(e.text, e.type, e.start) for e in kept[0]] == [(long[:-1], "LOC", 0)]
    assert [(e.text, e.type, e.start) for e in kept[1]] == [("Paris", "LOC", 1)]
    assert kept[0][0].score == pytest.approx(0.6, abs=1e-4)
    assert TransformersNER(model=str(path), min_score=0.7)([long, short]) == [[], []]
    dates = _constant_ner(tmp_path / "date", "B-DATE", 0.9)
    assert TransformersNER(model=str(dates))([short]) == [[]]  # dates and numbers are not names


def test_transformers_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(BuildError, match="no-such-model") as err:
        TransformersNER(model=str(missing))(["Who is Rand Paul?"])
    assert "ner.model=<local path>" in str(err.value) and "ner=fallback" in str(err.value)
    with pytest.raises(BuildError, match="someone/not-a-model") as err:
        TransformersNER(model="someone/not-a-model", local_files_only=True)(["Who is Rand Paul?"])
    assert "offline" in str(err.value)


def test_fingerprints_follow_the_files_behind_the_settings(tmp_path: Path) -> None:
    """Part of the NER stage's cache key: the gazetteer's entries and the model's files, not just their names."""
    tsv = tmp_path / "names.tsv"
    tsv.write_text("Zorblax Corp\tORG\n", encoding="utf-8")
    before = FallbackNER(gazetteer=str(tsv)).fingerprint()
    assert FallbackNER(gazetteer=str(tsv)).fingerprint() == before != FallbackNER().fingerprint()
    tsv.write_text("Zorblax Corp\tMISC\n", encoding="utf-8")
    assert FallbackNER(gazetteer=str(tsv)).fingerprint() != before
    folder = tmp_path / "ner-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    first = TransformersNER(model=str(folder)).fingerprint()
    (folder / "model.safetensors").write_bytes(b"retrained")
    assert first is not None and TransformersNER(model=str(folder)).fingerprint() != first
    assert TransformersNER(model="someone/not-cached").fingerprint() is None  # no files to look at


def test_builtin_gazetteer_key_is_unchanged() -> None:
    """The built-in word lists (ner/wordlists.yaml) give the fingerprint they gave as code, so the cache keys of
    existing work/ner-<key>.jsonl files stay valid; a deliberate edit of the gazetteer updates these figures."""
    ner = FallbackNER()
    assert (ner.fingerprint(), len(ner.gazetteer)) == ("6e2af37a5bc3b0ec", 876)


def test_transformers_untrained_head(tmp_path: Path) -> None:
    tokenizer = _tokenizer([t for t, _ in TRAIN])
    tokenizer.save_pretrained(tmp_path)
    _tiny_bert(len(tokenizer), None).save_pretrained(tmp_path)
    with pytest.raises(BuildError, match="no entity labels"):
        TransformersNER(model=str(tmp_path))(["Who is Rand Paul?"])
