import random

import pytest

from openseed.core.vocabulary import (
    COCO_PANOPTIC_NAMES,
    Vocabulary,
    clean_class_name,
    reference_class_name,
    reference_synonyms,
)
from tests.conftest import PANOPTIC


@pytest.mark.parametrize("raw, clean", [
    ("wall-brick", "brick wall"), ("sky-other-merged", "sky"), ("door-stuff", "door"),
    ("floor-other-merged", "floor"), ("window-blind", "window blind"), ("aerosol_can", "aerosol can"),
    ("Traffic Sign", "traffic sign"), ("playingfield", "playingfield"), ("person", "person"),
    ("tv", "tv"), ("hair drier", "hair drier"), ("water-other", "water"),
])
def test_clean_class_name(raw, clean):
    assert clean_class_name(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("x-ray", "x ray"), ("t-shirt", "t shirt"), ("hot-dog", "hot dog"), ("Hot-air balloon", "hot air balloon"),
    ("wall-mounted", "wall mounted"), ("sky-other", "sky other"), ("wall-brick ", "brick wall"),
])
def test_coco_rewriting_only_for_coco_names(raw, clean):
    # the COCO panoptic rule ("wall-brick" -> "brick wall", -merged / -other / -stuff dropped) is for COCO's own
    # names: any other hyphenated name keeps its words in order
    assert clean_class_name(raw) == clean


def test_hyphenated_names_of_other_data_sets_keep_their_order_in_both_styles():
    vocab = Vocabulary.from_coco_categories([{"id": 1, "name": "x-ray"}, {"id": 2, "name": "T-Shirt/tee-shirt"},
                                             {"id": 3, "name": "wall-brick", "isthing": 0},
                                             {"id": 4, "name": "hot-dog"}, {"id": 5, "name": "sky-other-merged"}])
    assert vocab.prompt_names() == ["x ray", "t shirt", "brick wall", "hot dog", "sky"]
    assert vocab.categories[1].synonyms == ("t shirt", "tee shirt")
    assert vocab.prompt_names(style="reference") == ["x-ray", "T-Shirt", "wall-brick", "hot-dog", "sky"]


def test_all_coco_panoptic_names_clean_to_words():
    import json

    categories = json.loads((PANOPTIC / "panoptic_coco_categories.json").read_text())
    vocab = Vocabulary.from_coco_categories(categories)
    names = vocab.prompt_names()
    assert len(names) == 133 and vocab.num_things == 80
    assert vocab.names == list(COCO_PANOPTIC_NAMES)  # the constant the COCO rewriting keys on is COCO's own list
    assert all("-" not in n and "merged" not in n and n == n.strip() for n in names)
    assert len(set(names)) == 133  # cleaning never merges two COCO classes into one name


def test_synonyms_sampled_in_training_canonical_in_evaluation():
    vocab = Vocabulary.from_coco_categories([{"id": 3, "name": "Sofa/Couch"}, {"id": 7, "name": "dog"}])
    assert vocab.categories[0].synonyms == ("sofa", "couch")
    assert vocab.prompt_names() == ["sofa", "dog"]
    drawn = {vocab.prompt_names(random.Random(seed))[0] for seed in range(50)}
    assert drawn == {"sofa", "couch"}


def test_ids_labels_and_round_trip(tmp_path):
    vocab = Vocabulary.from_coco_categories([{"id": 0, "name": "_background_"}, {"id": 5, "name": "cat"},
                                             {"id": 9, "name": "grass-merged", "isthing": 0}])
    assert vocab.index_of_id(0) == 0 and vocab.index_of_id(9) == 2 and vocab.is_thing == [True, True, False]
    with pytest.raises(KeyError, match="unknown category id 4"):
        vocab.index_of_id(4)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab


def test_bad_vocabularies_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="duplicate category id 1"):
        Vocabulary.from_coco_categories([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(ValueError, match="at least one"):
        Vocabulary([])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Vocabulary.load(tmp_path / "missing.json")


def test_model_side_imports_stay_light():
    """The model (openseed.modeling, openseed.losses, openseed.core.batch) never imports Lightning, Hydra or
    webdataset: it is a plain nn.Module usable from a notebook."""
    import subprocess
    import sys

    code = ("import sys, openseed.modeling.openseed, openseed.losses.criterion; "
            "bad = [m for m in ('lightning', 'webdataset', 'hydra') if m in sys.modules]; print(bad); "
            "sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    from openseed.data import OpenSeeDDataModule

    assert OpenSeeDDataModule.__name__ == "OpenSeeDDataModule"


@pytest.mark.parametrize("raw, evaluation, training", [
    ("wall-brick", "wall-brick", "wall-brick"), ("sky-other-merged", "sky", "sky"), ("door-stuff", "door", "door"),
    ("Traffic Sign", "Traffic Sign", "Traffic Sign"), ("aerosol_can", "aerosol_can", "aerosol_can"),
    ("building, edifice", "building, edifice", "building edifice"), ("salt+pepper", "salt+pepper", "salt pepper"),
])
def test_reference_class_name(raw, evaluation, training):
    assert reference_class_name(raw) == evaluation
    assert reference_class_name(raw, training=True) == training


def test_reference_name_style():
    vocab = Vocabulary.from_coco_categories([{"id": 3, "name": "sofa/couch,settee"}, {"id": 7, "name": "wall-brick"},
                                             {"id": 9, "name": "sky-other-merged", "isthing": 0}])
    assert reference_synonyms("sofa/couch,settee") == ("sofa", "couch,settee")
    assert vocab.prompt_names(style="reference") == ["sofa", "wall-brick", "sky"]
    drawn = {vocab.prompt_names(random.Random(seed), style="reference")[0] for seed in range(50)}
    assert drawn == {"sofa", "couchsettee"}
    assert vocab.prompt_names(random.Random(0), style="reference")[1:] == ["wall-brick", "sky"]
    # the default is unchanged
    assert vocab.prompt_names() == ["sofa", "brick wall", "sky"]
    with pytest.raises(ValueError, match="unknown name style"):
        vocab.prompt_names(style="clip")
