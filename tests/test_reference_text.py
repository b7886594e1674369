"""Text side against the authors' OpenSeeD code (fixtures in ../shared/reference, see its README "Text"): the CLIP
BPE ids of the 81 prompts per class, and the class embeddings of the small models' text transformers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import yaml

from openseed.core.vocabulary import Vocabulary
from openseed.modeling.clip_text import END_OF_TEXT, START_OF_TEXT, ClipTextTransformer
from openseed.modeling.text_encoder import PROMPT_TEMPLATES, TextEncoder, build_text_tower
from tests._reference import ARCHITECTURES, load_npz, meta, reference_path

TOWER_PREFIX = "sem_seg_head.predictor.lang_encoder.lang_encoder."
PROJECTION_KEY = "sem_seg_head.predictor.lang_encoder.lang_proj"


def _text_config(arch: str) -> tuple[dict, int]:
    config = yaml.safe_load(reference_path(arch, "config.yaml").read_text())["MODEL"]
    return config["TEXT"], config["DIM_PROJ"]


def _tower(arch: str) -> ClipTextTransformer:
    text, _ = _text_config(arch)
    return build_text_tower("clip_transformer", context_length=text["CONTEXT_LENGTH"], width=text["WIDTH"],
                            layers=text["LAYERS"], heads=text["HEADS"])


def _reference_encoder(arch: str) -> TextEncoder:
    """A clip_transformer tower + projection loaded from the fixture's weights, reference name style."""
    weights = torch.load(reference_path(arch, "weights.pt"), weights_only=True)
    tower = _tower(arch)
    tower.load_state_dict({k[len(TOWER_PREFIX):]: v for k, v in weights.items() if k.startswith(TOWER_PREFIX)})
    encoder = TextEncoder(tower, _text_config(arch)[1], name_style="reference").eval()
    encoder.projection.load_state_dict({"weight": weights[PROJECTION_KEY].T})
    return encoder


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixtures were recorded
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_token_ids_match_the_reference(arch):
    expected = load_npz(arch)
    vocab = Vocabulary.from_names(meta(expected)["names"])
    tower = _tower(arch)
    assert tower.context_length == expected["text_token_ids"].shape[-1]
    encoder = TextEncoder(tower, 8, name_style="reference")
    prompts = encoder.prompts(vocab, training=False)
    assert prompts[7 * len(PROMPT_TEMPLATES)] == "sky."  # "sky-other-merged" in the bare template
    ids, mask = tower.tokenize(prompts)
    np.testing.assert_array_equal(ids.view(len(vocab), len(PROMPT_TEMPLATES), -1).numpy(),
                                  expected["text_token_ids"])
    assert torch.equal(mask.sum(dim=1), (ids == END_OF_TEXT).int().argmax(dim=1) + 1)  # 1 up to the first EOS


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_class_embeddings_match_the_reference(arch):
    expected = load_npz(arch)
    vocab = Vocabulary.from_names(meta(expected)["names"])
    encoder = _reference_encoder(arch)
    with torch.no_grad():
        embeddings = encoder.encode_vocabulary(vocab)
        per_template = encoder._project(encoder._template_features(vocab).flatten(0, 1))
    per_template = per_template.view(len(vocab), len(PROMPT_TEMPLATES), -1).numpy()
    np.testing.assert_allclose(per_template, expected["text_embeddings_per_template"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(embeddings.numpy(), expected["text_embeddings"], atol=1e-4, rtol=1e-4)


def test_a_checkpoint_with_another_context_does_not_load():
    weights = torch.load(reference_path("swint_nodecouple", "weights.pt"), weights_only=True)
    state = {k[len(TOWER_PREFIX):]: v for k, v in weights.items() if k.startswith(TOWER_PREFIX)}
    assert state["positional_embedding"].shape == (18, 64)
    tower = build_text_tower("clip_transformer", context_length=77, width=64, layers=2, heads=2)
    before = tower.positional_embedding.detach().clone()
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"text context is 18.*context_length=18"):
            tower.load_state_dict(state, strict=strict)
    encoder = TextEncoder(tower, 48)
    with pytest.raises(RuntimeError, match="size mismatch for tower.positional_embedding"):
        encoder.load_state_dict({**{f"tower.{k}": v for k, v in state.items()},
                                 "projection.weight": torch.zeros(48, 64)}, strict=False)
    assert torch.equal(tower.positional_embedding, before)


def test_state_dict_layout_is_the_references():
    arch = "swint_decouple"
    weights = torch.load(reference_path(arch, "weights.pt"), weights_only=True)
    reference = {k[len(TOWER_PREFIX):]: tuple(v.shape) for k, v in weights.items() if k.startswith(TOWER_PREFIX)}
    ours = {k: tuple(v.shape) for k, v in _tower(arch).state_dict().items()}
    assert list(ours) == list(reference) and ours == reference


def test_tokenizer_matches_open_clip():
    """The same BPE as open_clip's SimpleTokenizer, apart from the padding id (0 there, 49407 here)."""
    from open_clip.tokenizer import SimpleTokenizer

    texts = ["A photo of a Sky-Other-Merged.", "wall-brick", "traffic  light\t", "café crème 2024!!", "it's 'quoted'",
             "hair drier/blow dryer", "日本語 テキスト", "x" * 300, "", "  ", "a+b, c"]
    tower = build_text_tower("clip_transformer", context_length=18, width=8, layers=1, heads=1)
    ids, mask = tower.tokenize(texts)
    theirs = SimpleTokenizer()(texts, context_length=18)
    assert torch.equal(ids, theirs.masked_fill(mask == 0, END_OF_TEXT))
    assert (ids[:, 0] == START_OF_TEXT).all() and ids[7, -1] == END_OF_TEXT  # truncation keeps the end token
    assert ids[8, :2].tolist() == [START_OF_TEXT, END_OF_TEXT]


def test_tower_is_picklable_and_offline():
    tower = build_text_tower("clip_transformer", context_length=18, width=16, layers=1, heads=2)
    copy = pickle.loads(pickle.dumps(tower))
    ids, mask = tower.tokenize(["a photo of a dog.", "sky"])
    assert torch.equal(copy.tokenize(["a photo of a dog.", "sky"])[0], ids)
    with torch.no_grad():
        assert torch.equal(copy(ids, mask), tower(ids, mask))
        # causal: padding after the end token and the attention mask change nothing
        short = tower(ids[:, :8], None)
    assert torch.allclose(short, tower(ids, mask).detach(), atol=1e-6)
    assert tower.width == 16 and tower(ids, mask).shape == (2, 16)


def test_options():
    with pytest.raises(ValueError, match="unknown clip_transformer option"):
        build_text_tower("clip_transformer", depth=3)
    with pytest.raises(ValueError, match="takes no options"):
        build_text_tower("tiny", width=8)
    tower = build_text_tower("clip_transformer", width=16, layers=1, heads=2)
    assert tower.context_length == 77 == tower.tokenize(["dog"])[0].shape[1]
    assert tower.token_embedding.weight.shape == (49408, 16)


def test_tokens_after_the_last_end_of_text_are_skipped_without_changing_the_result():
    """The tower is causal and pools at the first end-of-text token, so it runs only up to the batch's last one:
    a text gives the same features alone (fewer columns) as in a batch with a longer text, and the same as with
    arbitrary tokens written after its end-of-text token."""
    torch.manual_seed(0)
    tower = ClipTextTransformer(context_length=77, width=64, layers=2, heads=2).eval()
    ids, _ = tower.tokenize(["a dog.", "a photo of the hard to see sports ball."])
    with torch.no_grad():
        together = tower(ids)
        alone = torch.cat([tower(ids[:1]), tower(ids[1:])])
        noisy = ids.clone()
        end = int(ids[0].argmax()) + 1
        noisy[0, end:] = torch.randint(0, START_OF_TEXT, (77 - end,))  # anything after the end-of-text token
        untrimmed = tower(noisy)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(untrimmed[0], together[0], atol=1e-6, rtol=1e-5)
