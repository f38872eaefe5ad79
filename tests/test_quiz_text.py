"""The quiz's free-text vocabulary check (core.vocabulary) and the one rule that reads folder and
expert labels as class keys (core.panels.class_key_for_label). Pure functions: no model."""
from __future__ import annotations

import pytest

from core.data import class_key_for_folder
from core.panels import class_key_for_label, load_attribute_phrases, load_panels
from core.vocabulary import (EXAMPLES, expand_abbreviations, morphology_vocabulary, morphology_words, negated_classes,
                             ungrounded_terms)

PANELS = load_panels()
VOCABULARY = morphology_vocabulary(PANELS, load_attribute_phrases())

REAL = ["large cell with bilobed nucleus", "orange granules", "small cell, big dark nucleus",
        "segmented nucleus with three to five lobes and pale pink cytoplasm", "Neutrophils", "it's a monocyte",
        "lymphoblast with prominent nucleolus", "gray cytoplasm with a few vacuoles", "high N:C ratio",
        "a lobe-shaped nucleus", "immature granulocyte precursor", "Pre-B ALL"]
NONSENSE = ["a cell", "cell", "Cells.", "no idea", "I don't know", "asdf", "?", "123", "", "a cat", "blood",
            "not sure, sorry", "a white blood cell", "the cell in the picture"]


@pytest.mark.parametrize("text", REAL)
def test_real_descriptions_use_a_word_the_model_knows(text):
    assert morphology_words(text, VOCABULARY)


@pytest.mark.parametrize("text", NONSENSE)
def test_answers_that_say_nothing_use_none(text):
    assert morphology_words(text, VOCABULARY) == []


def test_matched_words_are_listed_once_in_order_and_the_quiz_placeholder_passes():
    from ui.quiz import PLACEHOLDER

    assert morphology_words("large cell with bilobed nucleus", VOCABULARY) == ["large", "bilobed", "nucleus"]
    assert morphology_words("Nucleus, NUCLEUS and nuclei", VOCABULARY) == ["nucleus", "nuclei"]
    assert morphology_words(PLACEHOLDER, VOCABULARY) == ["large", "kidney", "nucleus"]
    # the words the refusal suggests are themselves known
    assert all(morphology_words(word, VOCABULARY) for word in EXAMPLES)


def test_a_class_named_by_a_stop_word_counts_in_capitals_only():
    """ALL (acute lymphoblastic leukaemia) is a class of the leukemia panel; "all" is English."""
    assert morphology_words("ALL", VOCABULARY) == ["all"]
    assert morphology_words("Pre-B ALL", VOCABULARY) == ["pre", "all"]
    assert morphology_words("CLL", VOCABULARY) == ["cll"]
    assert morphology_words("all of it", VOCABULARY) == [] and morphology_words("All", VOCABULARY) == []


def test_vocabulary_comes_from_sentences_names_keys_and_phrases():
    blood = morphology_vocabulary([PANELS["blood_cells"]], {})
    assert {"neutrophil", "granulocyte", "kidney", "thrombocytes"} <= blood  # names, sentences, paraphrases
    assert "uneven" not in blood and "uneven" in VOCABULARY  # only in attributes.json
    assert {"hematogones", "lymphoblasts", "pre", "pro"} <= VOCABULARY  # b_all sentences and key parts


def test_one_label_rule_for_folders_and_the_quiz():
    keys = ["early_pre_b", "pro_b", "ig", "neutrophil"]
    assert [class_key_for_label(x, keys) for x in ("Early Pre-B", " PRO_B ", "IG", "ig")] == [
        "early_pre_b", "pro_b", "ig", "ig"]
    # without the quiz's options, no plurals or display names: a training folder is read by its key only
    assert [class_key_for_label(x, keys) for x in ("Neutrophils", "Pro B cells", "", None)] == [None] * 4
    assert class_key_for_folder("Neutrophils", set(keys)) == "Neutrophils"
    assert class_key_for_folder("early-pre-B", set(keys)) == "early_pre_b"
    # a label two keys could mean is read as neither; a key ending in "s" is not lost to the plural rule
    assert class_key_for_label("Pro B", ["pro_b", "Pro-B"]) is None
    assert class_key_for_label("Blasts", ["blast", "blasts"], plurals=True) == "blasts"
    assert class_key_for_label("Blasts", ["blast"], plurals=True) == "blast"


def test_panel_reads_plurals_and_display_names():
    blood, b_all = PANELS["blood_cells"], PANELS["b_all"]
    assert blood.key_for_label("Neutrophils") == "neutrophil"
    assert blood.key_for_label("Immature granulocytes") == "ig"
    assert blood.key_for_label("IGs") == "ig"
    assert b_all.key_for_label("early-pre-B") == "early_pre_b"
    assert b_all.key_for_label("Benign (hematogones)") == "benign"
    assert b_all.key_for_label("Pre-B ALL") == "pre_b"
    assert blood.key_for_label("smudge") is None and blood.key_for_label(None) is None


def test_short_forms_and_spellings_are_read():
    """Browser test: "mono", "lymph", "PMN" were refused as naming no morphology."""
    assert expand_abbreviations("2 Monos, a PMN and segs") == "2 monocytes, a neutrophil and segmented neutrophils"
    assert expand_abbreviations("lymph; eos; NRBC") == "lymphocyte; eosinophil; erythroblast"
    assert expand_abbreviations("monocytoid, seginal") == "monocytoid, seginal"  # whole words only
    for text in ("mono", "lymph", "PMN", "segs", "eos", "haematogone"):
        assert morphology_words(expand_abbreviations(text), VOCABULARY), text


def test_terms_the_model_was_not_trained_on_are_named_not_graded():
    """"myeloblast" landed on the neutrophil sentence and was scored correct on a neutrophil."""
    for text in ("myeloblast", "toxic granulation", "hypersegmented"):
        assert morphology_words(expand_abbreviations(text), VOCABULARY) == [], text
    assert ungrounded_terms("Myeloblasts with Auer rods") == ["myeloblasts", "auer", "rods"]
    assert ungrounded_terms("large cell, bilobed nucleus") == []


def test_an_answer_saying_what_the_cell_is_not_is_found():
    """Browser test: "not a neutrophil" was scored Correct on a neutrophil (its nearest class)."""
    assert negated_classes("not a neutrophil", PANELS) == ["neutrophil"]
    assert negated_classes("It isn't a lymphocyte", PANELS) == ["lymphocyte"]
    assert negated_classes("neutrophil, not a mono", PANELS) == ["monocyte"]
    assert negated_classes("neither neutrophil nor eosinophil", PANELS) == ["neutrophil", "eosinophil"]
    assert negated_classes("this isn\u2019t a neutrophil", PANELS) == ["neutrophil"]
    # through verbs of resemblance (a leftover of the review: these were scored)
    assert negated_classes("doesn't look like a neutrophil", PANELS) == ["neutrophil"]
    assert negated_classes("it does not seem to be a lymphocyte", PANELS) == ["lymphocyte"]
    assert negated_classes("cannot be a monocyte, granules too coarse", PANELS) == ["monocyte"]
    assert negated_classes("unlike a neutrophil, the nucleus is round", PANELS) == ["neutrophil"]
    assert negated_classes("a lymphocyte instead of a blast", PANELS) == ["blast"]
    # through a comparison later in the clause (a leftover of session 10: these were scored)
    assert negated_classes("not lobulated like a neutrophil", PANELS) == ["neutrophil"]
    assert negated_classes("no granules as in an eosinophil", PANELS) == ["eosinophil"]
    assert negated_classes("nucleus not as folded as a monocyte's", PANELS) == ["monocyte"]
    assert negated_classes("without the dark granules of a basophil", PANELS) == ["basophil"]
    assert negated_classes("chromatin not denser than a lymphocyte", PANELS) == ["lymphocyte"]
    # a negation reaches only the next word (or article and word), never past a comma (review)
    for text in ("no granules, round nucleus", "non-segmented nucleus", "neutrophil without vacuoles",
                 "not granular, a small lymphocyte with dense chromatin and no nucleolus",
                 "small cell, round nucleus, no granules, lymphocyte", "dense nucleus, not segmented, lymphocyte",
                 "round nucleus not lobed, a lymphocyte", "non-segmented neutrophil", "a non-seg neutrophil",
                 "no nucleoli, mature lymphocyte", "no pre-B features, benign",
                 "doesn't look granular, a lymphocyte", "does not look like much, neutrophil",
                 "cannot see granules, lymphocyte", "not lobulated, like a lymphocyte",
                 "not lobed but as round as a lymphocyte", "no granules; like a lymphocyte",
                 "no vacuoles so like a lymphocyte", "no granules in this lymphocyte"):
        assert negated_classes(text, PANELS) == [], text
