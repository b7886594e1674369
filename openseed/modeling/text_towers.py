"""Text towers: one interface over the text models the encoder can read (``TextTower``), and the two Hugging Face
kinds (a mean-pooled BERT-style encoder, a CLIP text model). The reference's own CLIP-style transformer is
``openseed.modeling.clip_text``; ``openseed.modeling.text_encoder.build_text_tower`` makes any of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


class TextTower(nn.Module):
    """A text model with its tokenizer, pooled to one feature vector per text.

    Attributes:
        width: size of the pooled features.
        tokenizer: a Hugging Face tokenizer (any callable with the same call signature that returns ``input_ids``
            and ``attention_mask`` tensors).
        max_length: longer texts are truncated to this many tokens.
    """

    def __init__(self, tokenizer: Callable, width: int, max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.width = width
        self.max_length = max_length

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Texts -> (input_ids, attention_mask), both long [N, L], padded to the longest text (CPU tensors)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: long [N, L] -> pooled features [N, width] (not normalised)."""
        raise NotImplementedError


class MeanPooledTower(TextTower):
    """A BERT-style encoder whose token states are averaged over the attention mask (as sentence-transformers
    pools all-MiniLM-L6-v2)."""

    def __init__(self, model: nn.Module, tokenizer: Callable, max_length: int):
        super().__init__(tokenizer, model.config.hidden_size, max_length)
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [N, L, width]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class CLIPTower(TextTower):
    """A CLIP text transformer; the pooled feature is the projected end-of-text token state (``text_embeds``)."""

    def __init__(self, model: nn.Module, tokenizer: Callable):
        super().__init__(tokenizer, model.config.projection_dim, model.config.max_position_embeddings)
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
