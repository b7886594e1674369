"""Text encoder: towers, prompt sampling / ensembling, cache, gradients, offline loading."""

from __future__ import annotations

import random
import string

import pytest
import torch
import torch.nn.functional as F

from openseed.core.vocabulary import Vocabulary
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
    assert PROMPT_TEMPLATES[:2] == ("{}.", "a photo of a {}.")  # the reference OpenSeeD order
    assert {"a bad photo of a {}.", "a photo of many {}.", "a tattoo of the {}.", "itap of my {}."} <= set(
        PROMPT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)


def test_unknown_kind():
    with pytest.raises(ValueError, match="minilm, clip, tiny, clip_transformer"):
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

    # the ensemble is the normalised mean of the per-prompt joint embeddings (prompts embedded one at a time here)
    with torch.no_grad():
        reference = []
        for name in vocab.prompt_names():
            features = [F.normalize(tiny(*tiny.tokenize([t.format(name)])), dim=-1) for t in PROMPT_TEMPLATES]
            reference.append(F.normalize(encoder.projection(torch.cat(features)), dim=-1).mean(dim=0))
        expected = F.normalize(torch.stack(reference), dim=-1)
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
    assert evaluation[2 * len(PROMPT_TEMPLATES)] == "brick wall."
    assert evaluation[2 * len(PROMPT_TEMPLATES) + 1] == "a photo of a brick wall."


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


def test_ensemble_averages_projected_embeddings(tiny, vocab):
    """Each template is projected and normalised before the average (CLIP's and the reference's order): with a
    non-orthogonal projection this differs from projecting the average of the tower features."""
    encoder = TextEncoder(tiny, 6, templates=["{}.", "a photo of a {}.", "a drawing of the {}."]).eval()
    with torch.no_grad():
        encoder.projection.weight.copy_(torch.randn(6, tiny.width, generator=torch.Generator().manual_seed(0)))
        encoder.projection.weight[:, 0] *= 25.0  # far from orthogonal
        embeddings = encoder.encode_vocabulary(vocab)
        by_hand, projected_mean = [], []
        for name in vocab.prompt_names():
            ids, mask = tiny.tokenize([t.format(name) for t in encoder.templates])
            features = F.normalize(tiny(ids, mask), dim=-1)  # [T, width]
            joint = features @ encoder.projection.weight.T  # [T, 6]
            joint = joint / joint.norm(dim=-1, keepdim=True)
            mean = joint.mean(dim=0)
            by_hand.append(mean / mean.norm())
            projected_mean.append(F.normalize(features.mean(dim=0) @ encoder.projection.weight.T, dim=0))
    assert torch.allclose(embeddings, torch.stack(by_hand), atol=1e-5)
    assert not torch.allclose(embeddings, torch.stack(projected_mean), atol=1e-3)


def test_cached_ensemble_follows_the_projection(tiny, vocab):
    """The evaluation cache holds tower features only: any change of the projection (in place, as an optimizer
    does, or with gradients) gives exactly the uncached result."""
    encoder = TextEncoder(tiny, 8, trainable=False).eval()
    uncached = TextEncoder(tiny, 8, trainable=False, cache_eval=False).eval()
    for _ in range(3):
        uncached.projection.load_state_dict(encoder.projection.state_dict())
        with torch.no_grad():
            cached = encoder.encode_vocabulary(vocab)
            assert torch.equal(encoder.encode_vocabulary(vocab), cached)
        assert torch.allclose(cached, uncached.encode_vocabulary(vocab), atol=1e-6)
        with_grad = encoder.encode_vocabulary(vocab)
        assert with_grad.requires_grad and torch.allclose(with_grad, cached, atol=1e-6)
        with torch.no_grad():
            encoder.projection.weight.add_(0.1 * torch.randn_like(encoder.projection.weight))
    assert len(encoder._eval_cache) == 1 and next(iter(encoder._eval_cache.values()))[1].shape == (
        len(vocab), len(PROMPT_TEMPLATES), tiny.width)
    fresh = TextEncoder(tiny, 8, trainable=False).eval()
    with torch.inference_mode():  # a cache filled in inference mode serves a later call that needs gradients
        fresh.encode_vocabulary(vocab)
    fresh.encode_vocabulary(vocab).sum().backward()
    assert fresh.projection.weight.grad.abs().sum() > 0


def test_reference_name_style(tiny, vocab):
    encoder = TextEncoder(tiny, 8, name_style="reference")
    evaluation = encoder.prompts(vocab, training=False)
    names = evaluation[::len(PROMPT_TEMPLATES)]
    assert names == ["person.", "sofa.", "wall-brick.", "sky.", "dog."]
    drawn = {encoder.prompts(vocab, training=True, rng=random.Random(seed))[1] for seed in range(30)}
    assert {"sofa", "couch"} == {word for p in drawn for word in ("sofa", "couch") if word in p}
    assert all("brick wall" not in p for p in encoder.prompts(vocab, True, random.Random(0)))
    # the evaluation cache tells the styles apart
    encoder.eval()
    openseed_style = TextEncoder(tiny, 8).eval()
    openseed_style.projection.load_state_dict(encoder.projection.state_dict())
    reference = encoder.encode_vocabulary(vocab)
    encoder.name_style = "openseed"
    assert torch.allclose(encoder.encode_vocabulary(vocab), openseed_style.encode_vocabulary(vocab), atol=1e-6)
    assert not torch.allclose(encoder.encode_vocabulary(vocab), reference, atol=1e-3)
    assert {key[0] for key in encoder._eval_cache} == {"openseed", "reference"}
    with pytest.raises(ValueError, match="name_style"):
        TextEncoder(tiny, 8, name_style="clip")


def test_clip_transformer_tower_in_the_encoder(vocab):
    tower = build_text_tower("clip_transformer", context_length=18, width=32, layers=2, heads=2)
    keys = set(tower.state_dict())
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            "resblocks.1.attn.in_proj_weight", "resblocks.1.attn.in_proj_bias", "resblocks.1.attn.out_proj.weight",
            "resblocks.1.attn.out_proj.bias", "resblocks.1.mlp.c_fc.weight", "resblocks.1.mlp.c_proj.bias",
            "resblocks.1.ln_1.weight", "resblocks.1.ln_2.bias"} <= keys
    assert len(keys) == 4 + 2 * 12
    encoder = TextEncoder(tower, 16, name_style="reference").eval()
    assert encoder.encode_vocabulary(vocab).shape == (len(vocab), 16)
    encoder.train()
    encoder.encode_vocabulary(vocab, rng=random.Random(0)).pow(3).sum().backward()
    assert tower.token_embedding.weight.grad.abs().sum() > 0


def test_frozen_tower_features_from_autocast_are_not_served_in_full_precision(tiny, vocab):
    """Features computed under CPU bf16 autocast carry bf16 rounding: a later full-precision call must not get them."""
    encoder = TextEncoder(tiny, 8, trainable=False).train()
    prompts = encoder.prompts(vocab, True, random.Random(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = encoder._tower_features(prompts)
    full = encoder._tower_features(prompts)
    fresh = TextEncoder(tiny, 8, trainable=False)._run_tower(prompts)
    assert not torch.equal(under_autocast, fresh)  # the tower's matmuls ran in bf16
    assert full.dtype == torch.float32 and torch.equal(full, fresh)
