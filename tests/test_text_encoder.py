"""Text encoder: towers, prompt sampling / ensembling, cache, gradients, offline loading."""

from __future__ import annotations

import random
import string

import pytest
import torch
import torch.nn.functional as F

from openseed.data.vocab import Vocabulary
from openseed.modeling.text_encoder import PROMPT_TEMPLATES, TextEncoder, build_text_tower

COCO_LIKE = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "sofa/couch", "isthing": 1},
    {"id": 3, "name": "wall-brick", "isthing": 0},
    {"id": 4, "name": "sky-other-merged", "isthing": 0},
    {"id": 5, "name": "dog", "isthing": 1},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    return build_text_tower("minilm")


@pytest.fixture
def tiny():
    return build_text_tower("tiny")


@pytest.fixture
def vocab():
    return Vocabulary.from_coco_categories(COCO_LIKE)


def test_templates():
    assert len(PROMPT_TEMPLATES) == 81 == len(set(PROMPT_TEMPLATES))
    assert PROMPT_TEMPLATES[0] == "a photo of a {}."
    assert {"a bad photo of a {}.", "a photo of many {}.", "a tattoo of the {}.", "itap of my {}."} <= set(
        PROMPT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)


def test_unknown_kind():
    with pytest.raises(ValueError, match="minilm, clip, tiny"):
        build_text_tower("bert-huge")


def test_minilm_similarities_are_sane(minilm):
    assert minilm.width == 384
    encoder = TextEncoder(minilm, 384, trainable=False).eval()
    with torch.no_grad():
        encoder.projection.weight.copy_(torch.eye(384))
        texts = ["dog", "puppy", "car", "a photo of a cat", "kitten", "truck", "a photo of a kitten"]
        emb = dict(zip(texts, encoder.encode_texts(texts)))
        # the identity projection leaves the tower's mean-pooled features unchanged
        ids, mask = minilm.tokenize(["dog"])
        assert torch.allclose(F.normalize(minilm(ids, mask), dim=-1)[0], emb["dog"], atol=1e-6)

    def cos(a, b):
        return float(emb[a] @ emb[b])

    assert cos("dog", "puppy") > cos("dog", "car")
    assert cos("a photo of a cat", "kitten") > cos("a photo of a cat", "truck")
    assert cos("a photo of a kitten", "a photo of a cat") > cos("a photo of a kitten", "car")
    assert cos("car", "truck") > cos("car", "kitten")


def test_evaluation_embeddings(tiny, vocab):
    encoder = TextEncoder(tiny, 16).eval()
    first = encoder.encode_vocabulary(vocab)
    assert first.shape == (len(vocab), 16)
    assert torch.allclose(first.norm(dim=-1), torch.ones(len(vocab)), atol=1e-6)
    assert torch.equal(first, encoder.encode_vocabulary(vocab))  # cached
    uncached = TextEncoder(tiny, 16, cache_eval=False).eval()
    uncached.projection.load_state_dict(encoder.projection.state_dict())
    again = uncached.encode_vocabulary(vocab)
    assert torch.equal(again, uncached.encode_vocabulary(vocab))  # deterministic without the cache too
    assert torch.allclose(first, again, atol=1e-6)

    # the ensemble is the mean of the per-prompt normalised features (prompts embedded one at a time here)
    with torch.no_grad():
        reference = []
        for name in vocab.prompt_names():
            features = [F.normalize(tiny(*tiny.tokenize([t.format(name)])), dim=-1) for t in PROMPT_TEMPLATES]
            reference.append(torch.cat(features).mean(dim=0))
        expected = F.normalize(encoder.projection(torch.stack(reference)), dim=-1)
    assert torch.allclose(first, expected, atol=1e-5)

    single = TextEncoder(tiny, 16, templates=["a photo of a {}."]).eval()
    single.projection.load_state_dict(encoder.projection.state_dict())
    assert not torch.allclose(single.encode_vocabulary(vocab), first, atol=1e-3)


def test_projection_is_applied_after_the_cache(tiny, vocab):
    encoder = TextEncoder(tiny, 8, trainable=False).eval()
    before = encoder.encode_vocabulary(vocab)
    with torch.no_grad():
        encoder.projection.weight.mul_(-1)
    assert torch.allclose(encoder.encode_vocabulary(vocab), -before, atol=1e-6)


def test_cache_is_invalidated_when_the_tower_trains(tiny, vocab):
    encoder = TextEncoder(tiny, 8, trainable=True).eval()
    stale = encoder.encode_vocabulary(vocab)
    encoder.train()
    optimizer = torch.optim.SGD(encoder.param_groups(1.0), lr=1.0)
    encoder.encode_vocabulary(vocab, rng=random.Random(0)).sum().backward()
    optimizer.step()
    encoder.eval()
    fresh = encoder.encode_vocabulary(vocab)
    reference = TextEncoder(tiny, 8, cache_eval=False).eval()
    reference.projection.load_state_dict(encoder.projection.state_dict())
    assert torch.allclose(fresh, reference.encode_vocabulary(vocab), atol=1e-6)
    assert not torch.allclose(fresh, stale, atol=1e-4)

    # loading weights clears it too
    other = TextEncoder(build_text_tower("tiny"), 8).eval()
    other.encode_vocabulary(vocab)
    other.load_state_dict(encoder.state_dict())
    assert torch.allclose(other.encode_vocabulary(vocab), fresh, atol=1e-6)


def test_frozen_tower_cache_survives_training_mode(tiny, vocab):
    encoder = TextEncoder(tiny, 8, trainable=False).eval()
    encoder.encode_vocabulary(vocab)
    encoder.train().eval()
    assert encoder._eval_cache


def test_class_name_cleaning_is_shared(tiny, vocab):
    encoder = TextEncoder(tiny, 8)
    for training in (True, False):
        for seed in range(5):
            prompts = encoder.prompts(vocab, training=training, rng=random.Random(seed))
            text = " | ".join(prompts)
            assert "brick wall" in text and "wall-brick" not in text
            assert "sky" in text and "merged" not in text and "other" not in text
    assert len(encoder.prompts(vocab, training=True, rng=random.Random(0))) == len(vocab)
    evaluation = encoder.prompts(vocab, training=False)
    assert len(evaluation) == len(vocab) * len(PROMPT_TEMPLATES)
    assert evaluation[2 * len(PROMPT_TEMPLATES)] == "a photo of a brick wall."


def test_synonyms(tiny, vocab):
    encoder = TextEncoder(tiny, 8)
    seen = set()
    for seed in range(20):
        prompt = encoder.prompts(vocab, training=True, rng=random.Random(seed))[1]
        seen |= {word for word in ("sofa", "couch") if word in prompt}
    assert seen == {"sofa", "couch"}
    evaluation = encoder.prompts(vocab, training=False)
    assert not any("couch" in p for p in evaluation)
    assert sum("sofa" in p for p in evaluation) == len(PROMPT_TEMPLATES)
    # training prompts are reproducible from the rng, and from Python's global generator without one
    assert encoder.prompts(vocab, True, random.Random(3)) == encoder.prompts(vocab, True, random.Random(3))
    random.seed(7)
    drawn = encoder.prompts(vocab, True)
    random.seed(7)
    assert encoder.prompts(vocab, True) == drawn


def test_training_gradients_and_param_groups(vocab):
    trainable = TextEncoder(build_text_tower("tiny"), 8, trainable=True, lr_multiplier=0.1).train()
    emb = trainable.encode_vocabulary(vocab, rng=random.Random(0))
    assert emb.shape == (len(vocab), 8)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(vocab)), atol=1e-6)
    emb.pow(3).sum().backward()
    assert trainable.projection.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.tower.parameters())
    groups = {g["name"]: g for g in trainable.param_groups(1e-3)}
    assert groups["text_tower"]["lr"] == pytest.approx(1e-4) and groups["text_projection"]["lr"] == 1e-3
    assert len(groups["text_tower"]["params"]) == len(list(trainable.tower.parameters()))
    assert trainable.tower.training

    frozen = TextEncoder(build_text_tower("tiny"), 8, trainable=False).train()
    assert not frozen.tower.training
    assert not any(p.requires_grad for p in frozen.tower.parameters())
    frozen.encode_vocabulary(vocab, rng=random.Random(0)).pow(3).sum().backward()
    assert frozen.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.tower.parameters())
    assert [g["name"] for g in frozen.param_groups(1e-3)] == ["text_projection"]

    # evaluation embeddings of a training-mode module still train the projection, never the tower
    trainable.zero_grad()
    trainable.encode_vocabulary(vocab, training=False).pow(3).sum().backward()
    assert trainable.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in trainable.tower.parameters())


def test_encode_texts_chunked(tiny):
    texts = [f"{'a very ' * (i % 5)}long text number {i}" for i in range(23)]
    whole = TextEncoder(tiny, 8, chunk_size=512).eval()
    chunked = TextEncoder(tiny, 8, chunk_size=4).eval()
    chunked.projection.load_state_dict(whole.projection.state_dict())
    with torch.no_grad():
        expected = torch.cat([whole.encode_texts([t]) for t in texts])
        assert torch.allclose(whole.encode_texts(texts), expected, atol=1e-5)
        assert torch.allclose(chunked.encode_texts(texts), expected, atol=1e-5)


def _tiny_clip(folder):
    """A random 2-layer CLIP text model saved with a real (character-level) CLIP BPE tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    symbols = string.ascii_lowercase + string.digits + string.punctuation
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) for c in symbols})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=40, projection_dim=24,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_clip_tower_from_local_folder(tmp_path, vocab):
    _tiny_clip(tmp_path)
    tower = build_text_tower("clip", path=str(tmp_path))
    assert (tower.width, tower.max_length) == (24, 40)
    with torch.no_grad():
        short = tower(*tower.tokenize(["dog"]))
        batch = tower(*tower.tokenize(["dog", "a photo of a very large dog."]))
    assert batch.shape == (2, 24)
    assert torch.allclose(batch[0], short[0], atol=1e-5)  # pooled at the end-of-text token, not at the padding
    encoder = TextEncoder(tower, 16).eval()
    assert encoder.encode_vocabulary(vocab).shape == (len(vocab), 16)


@pytest.mark.parametrize("name", ["nonexistent-org/nonexistent-clip", "/nonexistent/clip/folder"])
def test_clip_unavailable_offline(name):
    with pytest.raises(RuntimeError, match=r"path=DIR"):
        build_text_tower("clip", path=name)


def test_frozen_tower_prompt_cache_is_exact_and_runs_the_tower_once_per_text(tiny, vocab):
    encoder = TextEncoder(tiny, 8, trainable=False).train()
    calls = []
    original = encoder.tower.forward
    encoder.tower.forward = lambda ids, mask: calls.append(ids.shape[0]) or original(ids, mask)
    rng = random.Random(0)
    first = encoder.encode_vocabulary(vocab, rng=random.Random(0))
    again = encoder.encode_vocabulary(vocab, rng=random.Random(0))  # same draws: all cached
    assert torch.equal(first, again) and sum(calls) == len(vocab.names)
    for _ in range(5):
        encoder.encode_vocabulary(vocab, rng=rng)
    assert sum(calls) == len(encoder._prompt_cache)  # every distinct prompt ran exactly once
    uncached = TextEncoder(tiny, 8, trainable=True)
    uncached.projection.load_state_dict(encoder.projection.state_dict())
    prompts = encoder.prompts(vocab, True, random.Random(0))
    assert torch.allclose(encoder._project(encoder._tower_features(prompts)),
                          uncached.eval()._project(uncached._run_tower(prompts)), atol=1e-6)
    encoder.load_state_dict(encoder.state_dict())
    assert not encoder._prompt_cache  # loading weights forgets it
