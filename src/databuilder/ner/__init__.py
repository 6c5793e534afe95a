"""Entity recognition for the data builder: find PER / ORG / LOC / MISC spans in the last user turn.

Two recognizers implement `src.databuilder.base.EntityRecognizer`:

* `TransformersNER`: a token-classification model (default ``dslim/bert-base-NER``, the BERT CoNLL-03
  tagger used for modality interpretation in the BPO paper), loaded on first call. The recommended option.
* `FallbackNER`: capitalisation rules plus a small built-in gazetteer; needs no weights and no network, and
  is deterministic. It is the weaker option: it misses lowercase mentions, unknown single names at a
  sentence start and text without a case signal, and its types come from a few suffix / title rules.
"""

from src.databuilder.ner.common import entity_type
from src.databuilder.ner.fallback import FallbackNER
from src.databuilder.ner.model import TransformersNER

__all__ = ["FallbackNER", "TransformersNER", "entity_type"]
