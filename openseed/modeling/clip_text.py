"""The CLIP-style text transformer of the authors' OpenSeeD checkpoints, with its BPE tokenizer.

* ``ClipBPETokenizer``: CLIP's byte-level BPE (49,408 tokens), read from the vocabulary file that the
  ``open-clip-torch`` package ships (``bpe_simple_vocab_16e6.txt.gz``; open_clip itself is never imported). Texts are
  fixed with ftfy, whitespace-collapsed and lower-cased, wrapped in ``<|startoftext|>`` (49406) and
  ``<|endoftext|>`` (49407), truncated to the context length with the end-of-text token kept last, and padded with
  49407 (as OpenSeeD's Hugging Face tokenizer pads; open_clip pads with 0).
* ``ClipTextTransformer``: token + learned positional embeddings, pre-norm residual blocks with causal
  self-attention (``nn.MultiheadAttention``, fused input projection) and a QuickGELU MLP, then ``ln_final``; the
  pooled feature is the final state at the first end-of-text token. LayerNorms are the TF-style ones of the
  reference (epsilon 1e-12 inside the square root, statistics in float32). Its ``state_dict`` keys are the
  reference's ``lang_encoder.lang_encoder.*`` keys without that prefix.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from openseed.modeling.text_towers import TextTower

CLIP_VOCAB_SIZE = 49408
START_OF_TEXT = 49406
END_OF_TEXT = 49407
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses from its vocabulary file
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, punctuation runs.
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def default_bpe_path() -> Path:
    """The BPE vocabulary file inside the installed ``open_clip`` package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the CLIP BPE vocabulary comes with open-clip-torch: `pip install open-clip-torch`, or "
                           f"pass the path of a {_BPE_FILE} file")
    return Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters (printable Latin-1
    bytes map to themselves, the others to code points from 256 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = chr(256 + len(alphabet) - len(printable))
    return alphabet


@functools.lru_cache(maxsize=4)
def _bpe_tables(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(token -> id, merge pair -> rank) from a CLIP BPE vocabulary file."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")
    except OSError as err:
        raise RuntimeError(f"cannot read the CLIP BPE vocabulary {path}: {err}") from err
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"{path} is not a CLIP BPE vocabulary ({len(merges)} merges, expected {_NUM_MERGES})")
    symbols = list(_byte_alphabet().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), *_SPECIAL]
    return {t: i for i, t in enumerate(tokens)}, {m: i for i, m in enumerate(merges)}


class ClipBPETokenizer:
    """CLIP's BPE tokenizer with OpenSeeD's padding (see the module docstring). Picklable: it holds the path of
    the vocabulary file; the tables are read once per process, on first use.

    Args:
        context_length: every text becomes exactly this many ids.
        bpe_path: a CLIP ``bpe_simple_vocab_16e6.txt.gz``; default: open_clip's copy.
    """

    vocab_size = CLIP_VOCAB_SIZE
    bos_token_id = START_OF_TEXT
    eos_token_id = END_OF_TEXT
    pad_token_id = END_OF_TEXT

    def __init__(self, context_length: int = 77, bpe_path: str | Path | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end of text), got {context_length}")
        self.context_length = context_length
        self.bpe_path = str(bpe_path or default_bpe_path())
        self._words: dict[str, tuple[str, ...]] = {}

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length, "bpe_path": self.bpe_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"ClipBPETokenizer(context_length={self.context_length}, bpe_path={self.bpe_path!r})"

    def _merge(self, word: str) -> tuple[str, ...]:
        """One pre-token (in the byte alphabet) -> its BPE symbols; the last one carries the ``</w>`` mark."""
        if word in self._words:
            return self._words[word]
        ranks = _bpe_tables(self.bpe_path)[1]
        symbols = (*word[:-1], word[-1] + "</w>")
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, len(ranks)))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = tuple(merged)
        self._words[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """One text -> its BPE ids, without start/end tokens or padding."""
        import ftfy
        import regex

        encoder = _bpe_tables(self.bpe_path)[0]
        text = regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()
        alphabet = _byte_alphabet()
        ids = []
        for piece in regex.findall(_PATTERN, text, flags=regex.IGNORECASE):
            if piece in _SPECIAL:
                ids.append(encoder[piece])
                continue
            ids.extend(encoder[s] for s in self._merge("".join(alphabet[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> dict[str, Tensor]:
        """Texts -> ``{"input_ids", "attention_mask"}``, long [N, context_length]: start, the text's ids (at most
        context_length - 2 of them), end, then end-of-text padding; the mask is 1 up to the end token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        input_ids = torch.full((len(texts), length), END_OF_TEXT, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [START_OF_TEXT, *self.encode(text)[:length - 2], END_OF_TEXT]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class FP32LayerNorm(nn.Module):
    """TF-style LayerNorm of the reference: statistics in float32, epsilon inside the square root, the affine
    transform in the input's dtype."""

    def __init__(self, width: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight * x.to(dtype) + self.bias


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``; sequence-first [L, N, width] as in the reference."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = FP32LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = FP32LayerNorm(width)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class ClipTextTransformer(TextTower):
    """The reference's causal text transformer as a ``TextTower`` (pooled feature: ``ln_final`` output at the first
    end-of-text token, [N, width]; ``width`` is the pooled size). ``attention_mask`` is accepted and ignored: the
    reference attends causally only, which already keeps every real token from seeing the padding after it.

    Randomly initialised as the reference initialises it (truncated normal, std 0.02); real weights come from a
    converted checkpoint. Loading a state dict whose context length or sizes differ fails (PyTorch's size-mismatch
    error, with the context lengths spelled out) rather than being dropped.
    """

    def __init__(self, context_length: int = 77, width: int = 512, layers: int = 12, heads: int = 8,
                 vocab_size: int = CLIP_VOCAB_SIZE, bpe_path: str | Path | None = None):
        if vocab_size < CLIP_VOCAB_SIZE:
            raise ValueError(f"vocab_size must hold the CLIP BPE's {CLIP_VOCAB_SIZE} tokens, got {vocab_size}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        super().__init__(ClipBPETokenizer(context_length, bpe_path), width, context_length)
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_final = FP32LayerNorm(width)
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        nn.init.trunc_normal_(self.token_embedding.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):  # the MLP and the attention output projections
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Texts -> (input_ids, attention_mask), long [N, context_length] (always padded to the context)."""
        batch = self.tokenizer(texts)
        return batch["input_ids"], batch["attention_mask"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids: long [N, L], L <= context_length -> pooled features [N, width]."""
        if input_ids.shape[1] > self.context_length:
            raise ValueError(f"{input_ids.shape[1]} tokens do not fit the context of {self.context_length}")
        # Causal attention: nothing after a text's end-of-text token reaches its pooled output, so the columns past
        # the batch's last one are left out (the same result; 77-token contexts of ~10-token prompts cost 5x less).
        length = int(input_ids.argmax(dim=-1).max()) + 1
        input_ids = input_ids[:, :length]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = x.transpose(0, 1)  # [L, N, width]
        for block in self.resblocks:
            x = block(x, mask)
        x = self.ln_final(x.transpose(0, 1))
        return x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        positions = state_dict.get(prefix + "positional_embedding")
        if positions is not None and positions.shape != self.positional_embedding.shape:
            error_msgs.append(f"the checkpoint's text context is {positions.shape[0]} (positional_embedding "
                              f"{tuple(positions.shape)}), this tower's is {self.context_length} "
                              f"({tuple(self.positional_embedding.shape)}): build the tower with "
                              f"context_length={positions.shape[0]} (and the checkpoint's width)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
