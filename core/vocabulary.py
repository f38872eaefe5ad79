"""Does a free-text answer say anything about morphology? A vocabulary check, not a similarity.

The text tower maps any string to some point, and the nearest class prototype of "no idea" or
"asdf" is as close (0.76-0.95) as that of a real description (0.69-0.99, v12 model), so no
similarity floor tells them apart. What does: whether the text uses a word the model was
trained on. The vocabulary is the content words of the panels' sentences and paraphrases,
class keys and display names, and the morphology phrases (``assets/attributes.json``), less
`STOP_WORDS`. Pure functions: no model, no streamlit.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from core.panels import Panel

# Words of the sentences that say nothing about how a cell looks, alone. Chosen against the
# vocabulary itself (only words that occur in it matter): function words; "cell", "blood",
# "white" (every quiz image is a blood cell); attribute *names* without a value ("shape",
# "colour", "size": "irregular shape" still passes on "irregular"); bare intensity and
# quantity words ("high", "light", "many", "little": "a little unsure" is no description,
# "little cell" is rare next to "small cell"); verbs of arrangement ("filled", "covering");
# numbers; and "no"/"not"/"without", which would let "no idea" through.
STOP_WORDS = frozenset("""
    a an the and or of with without to in is it its by than that this whose no not non all
    cell cells blood white smear field type typical like looking lying among between sometimes
    shape shaped size sized colour coloured color colored texture outline structure number
    high low light lighter deep bright little many several more most very early open ground
    present visible prominent inconspicuous obscured dispersed filled filling full packed
    covering crowding hide overlying joined fast slow growing progression two three five
""".split())

# Spellings and irregular plurals a learner may use for a word of the vocabulary.
VARIANTS = {"gray": "grey", "grayish": "greyish", "center": "centre", "leukemia": "leukaemia",
            "leukemic": "leukaemic", "haematogones": "hematogones", "haematogone": "hematogone",
            "nucleolus": "nucleoli"}

# Short forms hematologists write, expanded before the check and before the text tower reads the
# answer (MiniLM does not know "PMN" is a neutrophil). Whole words only, any case.
ABBREVIATIONS = {"mono": "monocyte", "lymph": "lymphocyte", "lympho": "lymphocyte", "pmn": "neutrophil",
                 "poly": "neutrophil", "seg": "segmented neutrophil", "eo": "eosinophil", "eos": "eosinophil",
                 "eosino": "eosinophil", "baso": "basophil", "nrbc": "erythroblast",
                 "plt": "platelet", "meta": "metamyelocyte", "myelo": "myelocyte", "promyelo": "promyelocyte"}

# Standard hematology terms the panels' sentences do not use but a learner may rightly write. Not
# part of the vocabulary: the nearest panel sentence of a term the model was never trained on is
# chance ("myeloblast" lands on the neutrophil, and was scored correct on one), so the quiz says
# it cannot grade them (`ungrounded_terms`) instead of refusing them as nonsense or grading them.
EXTRA_TERMS = frozenset("""
    myeloblast myeloblasts azurophilic hypersegmented hypogranular toxic granulation auer rods dohle
    smudge reactive atypical cleaved hairy nucleolated erythrocyte erythrocytes
""".split())

# An answer that says what the cell is not ("not a neutrophil") is not scored: the nearest class
# of "not a neutrophil" is the neutrophil (`negated_classes`).
NEGATIONS = frozenset({"not", "no", "never", "nor", "neither", "isn't", "isnt", "aren't", "wasn't", "doesn't",
                       "doesnt", "don't", "dont", "can't", "cant", "cannot", "unlike", "instead",
                       "without"})
# verbs a negation reaches through to its class word: "doesn't look like a neutrophil", "cannot
# be a monocyte", "does not seem to be a lymphocyte", "instead of a blast"
NEGATION_FILLERS = frozenset({"look", "looks", "like", "resemble", "resembles", "seem", "seems", "appear",
                              "appears", "to", "be", "of"})
MAX_FILLERS = 4
# ... and through a comparison anywhere later in its clause: "not lobulated like a neutrophil", "no
# granules as in an eosinophil", "not as big as a monocyte", "without the granules of a basophil".
# A clause ends at punctuation or a contrasting conjunction ("not lobed but a neutrophil").
COMPARISONS = frozenset({"like", "as", "than", "of"})
CLAUSE_ENDS = frozenset({"but", "so", "rather", "yet", "though", "although", "whereas"})
ARTICLES = frozenset({"a", "an", "the", "one"})
# words with their apostrophe ("isn't"), hyphenated words as one ("non-segmented"), and each
# punctuation mark as a token of its own, so that a negation never reaches past a comma
_NEGATION_TOKEN = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*|[,;:.!?()]")

# Shown when an answer is refused: words every panel's sentences use.
EXAMPLES = ("nucleus", "granules", "lobed", "cytoplasm")

_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, any script: "kidney-shaped" -> kidney, shaped


def words(text: str) -> list[str]:
    """Lower-case words of `text` (letters only; digits and punctuation split words)."""
    return _WORD.findall(text.lower())


def morphology_vocabulary(panels: Mapping[str, Panel] | Iterable[Panel],
                          attribute_phrases: Mapping[str, Mapping[str, Iterable[str]]]) -> frozenset[str]:
    """Content words the model knows: of every class's key, display name, sentence and
    paraphrases, and of every morphology phrase, less `STOP_WORDS` and one-letter words; a class
    key that is a stop word ("all") is kept in capitals only ("ALL")."""
    panel_list = list(panels.values() if isinstance(panels, Mapping) else panels)
    texts = [text for panel in panel_list for c in panel.classes
             for text in (c.key.replace("_", " "), c.name, *c.all_sentences)]
    texts += [phrase for values in attribute_phrases.values() for phrases in values.values() for phrase in phrases]
    known = {w for text in texts for w in words(text) if len(w) > 1 and w not in STOP_WORDS}
    # a class named by a stop word ("ALL", acute lymphoblastic leukaemia) counts only written in
    # capitals, as hematologists write it: "ALL" names a class, "all of it" names nothing
    keys = {c.key for panel in panel_list for c in panel.classes}
    return frozenset(known | {key.upper() for key in keys if key in STOP_WORDS})


def _forms(word: str) -> list[str]:
    """The word, its spelling variant, and simple singular/plural forms ("lobe" -> "lobes",
    "neutrophils" -> "neutrophil", "nuclei" stays)."""
    word = VARIANTS.get(word, word)
    forms = [word, word + "s"]
    if word.endswith("s"):
        forms.append(word[:-1])
    if word.endswith("es"):
        forms.append(word[:-2])
    return forms


def morphology_words(text: str, vocabulary: frozenset[str]) -> list[str]:
    """The words of `text` that are in `vocabulary` (up to spelling variants and plurals), in
    order, each once. Empty: the answer names nothing the model knows, and is not scored.
    "a cell" -> []; "large cell with bilobed nucleus" -> ["large", "bilobed", "nucleus"]."""
    found: list[str] = []
    for token in _WORD.findall(text):
        word = token.lower()
        if word in found or len(word) < 2:
            continue
        if token in vocabulary or (word not in STOP_WORDS and any(form in vocabulary for form in _forms(word))):
            found.append(word)
    return found


def expand_abbreviations(text: str) -> str:
    """`text` with the short forms of `ABBREVIATIONS` written out ("2 monos, PMN" -> "2 monocytes,
    neutrophil"); a plural short form keeps its "s"."""
    def full(match: re.Match) -> str:
        token = match.group(0)
        word = token.lower()
        if word in ABBREVIATIONS:
            return ABBREVIATIONS[word]
        if word.endswith("s") and word[:-1] in ABBREVIATIONS:
            return ABBREVIATIONS[word[:-1]] + "s"
        return token
    return _WORD.sub(full, text)


def negated_classes(text: str, panels: Mapping[str, Panel] | Iterable[Panel]) -> list[str]:
    """The class words `text` negates, in order: a negation right before a class name, with at
    most an article between ("not a neutrophil", "isn't a lymphocyte", "neither neutrophil nor
    eosinophil"), or verbs of resemblance ("doesn't look like a monocyte", "cannot be a blast",
    "unlike a lymphocyte"), or a comparison later in its clause ("not lobulated like a neutrophil");
    empty for an answer that says what the cell is. A negation reaches no further:
    "no granules, lymphocyte", "not segmented, a lymphocyte" and "non-segmented neutrophil" (a
    hyphenated "non-" is a modifier) describe the cell they name."""
    panel_list = list(panels.values() if isinstance(panels, Mapping) else panels)
    # whole class keys only: "pre" of pre_b would make "no pre-B features" a negated class
    class_words = {c.key for panel in panel_list for c in panel.classes
                   if "_" not in c.key and c.key not in STOP_WORDS} | {"granulocyte", "hematogone", "blast",
                                                                        "lymphoblast"}
    tokens = _NEGATION_TOKEN.findall(expand_abbreviations(text).lower())
    negated = []
    for i, token in enumerate(tokens[:-1]):
        if token.replace("\u2019", "'") not in NEGATIONS:
            continue
        for word in (_negated_word(tokens[i + 1:]), *_compared_words(tokens[i + 1:])):
            word = word and re.sub(r"['\u2019]s$", "", word)  # "a monocyte's" -> monocyte
            if word and any(form in class_words for form in _forms(word)) and word not in negated:
                negated.append(word)
    return negated


def _negated_word(after: list[str]) -> str | None:
    """The word a negation reaches in the tokens `after` it: past a few verbs of resemblance
    (`NEGATION_FILLERS`) and one article, never past punctuation or any other word."""
    position = 0
    while position < min(len(after), MAX_FILLERS) and after[position] in NEGATION_FILLERS:
        position += 1
    if position < len(after) and after[position] in ARTICLES:
        position += 1
    return after[position] if position < len(after) else None


def _compared_words(after: list[str]) -> list[str]:
    """The words right after a comparison (`COMPARISONS`, then an optional article, possibly
    "in": "as in an eosinophil") in the clause that `after` begins."""
    found = []
    for i, token in enumerate(after):
        if not token[0].isalpha() or token in CLAUSE_ENDS:
            break
        if token in COMPARISONS:
            rest = after[i + 1:i + 4]
            rest = rest[1:] if rest[:1] == ["in"] else rest
            rest = rest[1:] if rest[:1] and rest[0] in ARTICLES else rest
            if rest:
                found.append(rest[0])
    return found


def ungrounded_terms(text: str) -> list[str]:
    """The standard terms of `EXTRA_TERMS` that `text` uses, in order, each once."""
    found: list[str] = []
    for word in words(text):
        if word not in found and any(form in EXTRA_TERMS for form in _forms(word)):
            found.append(word)
    return found
