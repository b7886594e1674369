"""The OpenSeeD decoder: three query types, conditioned decoding, layer-wise box refinement, open-vocabulary heads.

SPEC.md section 2; the computation is the reference's (IDEA-Research/OpenSeeD, checked against ../shared/reference).
Queries are laid out along one axis as ``[conditioned (G x M) | foreground | background]``:

- foreground: language-guided selection of the top encoder tokens (score = max text similarity over the vocabulary);
  content = the token's (projected) feature, reference = its proposal box (anchor at the token's cell refined by the
  box head). The proposals are returned for supervision ("interm" outputs).
- background: learned content embeddings and learned anchor boxes, the same for every image.
- conditioned: built from (box, class) pairs: content = the class's text embedding through a learned projection,
  reference = the box (with noise in training). ``G`` groups of ``M`` slots, ``M`` = most boxes in an image.

One class head (projection into the text space + logit scale) and one box MLP serve the proposals and every decoder
layer. The proposals are *selected* by the class head on the encoder features as they are, and *predicted* (logits and
masks, for their loss) through the decoder's final LayerNorm, as every other prediction.

Self-attention masks: matching (fg + bg) queries never see conditioned ones; a conditioned group sees itself and the
matching queries, never another group; nobody sees a conditioned padding slot. Each layer: self-attention ->
deformable cross-attention around the reference box -> FFN, post-norm. After layer l, with ``h`` its output and ``r``
its input reference box (detached): the next reference box is ``sigmoid(box(h) + logit(r))`` (detached before it
enters layer l + 1), the loss box of layer l is ``sigmoid(box(norm(h)) + logit(r'))`` with ``r'`` the undetached box
of layer l - 1 ("look forward twice"), and its logits and masks come from ``norm(norm(h))`` (the decoder's final
LayerNorm applied twice, as the reference applies it: once in its decoder, once before its heads).

Which predictions carry masks (``forward(..., masks=)``): ``"all"`` (training, and whoever reads every layer), or,
for inference, ``"final"`` (only the last layer's) or ``"prompts"`` (only the last layer's conditioned queries: box
prompts). A mask is one [queries x mask_dim] by [mask_dim x H/4 x W/4] product per prediction, the decoder's
largest cost at full size (400 queries x 256 x 200 x 304 for an 800 x 1216 input, for each of the 11 predictions);
the logits and boxes of every layer stay.

Levels: the pixel decoder's memory is finest level first. ``level_order="coarse_first"`` makes the decoder read it in
the reverse order, as the reference does; level ``l`` in the decoder's order gets proposal anchors of side
``anchor_size x 2^l`` (so in the reference the coarsest level proposes the smallest anchors), and the deformable
cross-attention's per-level weights follow that order.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openseed.core.conditions import Conditions
from openseed.core.outputs import ConditionedOutputs, Outputs, Prediction
from openseed.modeling.layers import MLP, feed_forward, grid_positions, inverse_sigmoid, sine_embedding
from openseed.modeling.pixel_decoder import EncoderMemory
from openseed.ops import MSDeformAttn

LEVEL_ORDERS = ("fine_first", "coarse_first")
BOX_NOISE = ("corners", "reference")
BG_TRAINING = ("openseed", "reference")
MASK_MODES = ("all", "final", "prompts")


#: CLIP's initial log temperature, log(1 / 0.07).
LOGIT_SCALE_INIT = math.log(1 / 0.07)


class TextClassifier(nn.Module):
    """logits = exp(s) * cos(W h, t_k) (+ b): W projects queries into the text space, s a learned log-scale, b an
    optional learned bias.

    The bias (``bias=True``, our choice for models trained from scratch; the reference has none) starts at the prior
    probability ``prior_prob``, so sigmoid focal training starts from calm negatives. The log-scale starts at CLIP's
    ``log(1 / 0.07)`` (scale 14.3): the logits can then span the sigmoid's range from the first step. (With a scale of
    e = 2.7 and the prior bias of -4.6 no class could reach a probability above 0.13 until Adam had moved the scalar by
    ~1, i.e. thousands of steps at lr 1e-4: short runs never passed the panoptic score threshold.)"""

    def __init__(self, hidden_dim: int, text_dim: int, logit_scale_init: float = LOGIT_SCALE_INIT,
                 prior_prob: float = 0.01, bias: bool = True):
        super().__init__()
        self.project = nn.Linear(hidden_dim, text_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        if bias:
            self.bias = nn.Parameter(-torch.log(torch.tensor((1 - prior_prob) / prior_prob)))
        else:
            self.register_parameter("bias", None)

    def forward(self, queries: Tensor, text: Tensor) -> Tensor:
        """queries [B, Q, hidden], text [K, text_dim] -> logits [B, Q, K]."""
        projected = F.normalize(self.project(queries), dim=-1)
        logits = self.logit_scale.exp() * projected @ F.normalize(text, dim=-1).t()
        return logits if self.bias is None else logits + self.bias


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, ffn_dim: int, dropout: float,
                 act: str = "relu"):
        super().__init__()
        self.num_heads = num_heads
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout, act)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_boxes: Tensor, memory: EncoderMemory,
                attn_mask: Tensor | None) -> Tensor:
        """tgt, query_pos [B, Q, D]; reference_boxes [B, Q, 4] (cxcywh, detached); attn_mask [B * heads, Q, Q]."""
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(attended))
        levels = memory.spatial_shapes.shape[0]
        reference = reference_boxes[:, :, None].expand(-1, -1, levels, -1)
        sampled = self.cross_attn(tgt + query_pos, reference, memory.memory, memory.spatial_shapes,
                                  memory.level_start_index, memory.padding_mask)
        tgt = self.norm2(tgt + self.dropout(sampled))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class OpenSeeDDecoder(nn.Module):
    """Encoder memory + text embeddings (+ conditions) -> ``Outputs``.

    Args:
        hidden_dim: query width. text_dim: width of the text embeddings. mask_dim: channels of mask features.
        num_levels: encoder levels. num_fg, num_bg: matching queries of each type. With ``decoupled=False`` there are
            no background queries and ``num_fg + num_bg`` queries come from the one language-guided selection.
        conditioned: build conditioned queries when conditions are given (training: from ground truth).
        cond_budget: conditioned queries per image at most (groups x slots); box_noise_scale: box jitter (fraction
            of the box size) of the conditioned references in training.
        box_noise: "corners" (each corner moves by up to scale x half the box side: DN-DETR's noise as the paper
            describes it) or "reference" (the reference's: the centre moves by up to scale x half the side, width and
            height change by up to scale x the side; see ``noisy_boxes``).
        cond_over_budget: when the most targets of an image exceed ``cond_budget``: "one_group" (still one noisy
            group) or "none" (no denoising group for the batch, as the reference does).
        anchor_size: anchor side of level l proposals = anchor_size * 2^l (normalised; l in ``level_order``).
        class_bias: a learned bias on the class logits (see ``TextClassifier``); the reference has none.
        level_order: "fine_first" (the memory's order) or "coarse_first" (the reference's); see the module docstring.
        bg_training: how the background queries' content and anchors learn (no effect without bg queries).
            "openseed": they enter the decoder undetached (the content learns through every layer, the anchors
            through the first layer's loss boxes); the proposals are the fg queries only. "reference" (the
            reference's): they enter the decoder detached and, in training, the proposals carry them too, rows
            ``num_fg:`` = ``norm(bg content)`` through the class and mask heads with boxes ``sigmoid(bg anchor)``
            (no box head), so they learn through the proposals' loss only. In eval the proposals stay fg only
            (those rows equal the first prediction's bg rows; inference does not read the proposals).
    """

    def __init__(self, hidden_dim: int = 256, text_dim: int = 512, mask_dim: int = 256, num_levels: int = 4,
                 num_fg: int = 300, num_bg: int = 100, num_layers: int = 9, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 2048, dropout: float = 0.0, decoupled: bool = True, conditioned: bool = True,
                 cond_budget: int = 100, box_noise_scale: float = 0.4, anchor_size: float = 0.05,
                 logit_scale_init: float = LOGIT_SCALE_INIT, class_bias: bool = True,
                 level_order: str = "fine_first", box_noise: str = "corners", cond_over_budget: str = "one_group",
                 bg_training: str = "openseed"):
        super().__init__()
        if bg_training not in BG_TRAINING:
            raise ValueError(f"bg_training must be one of {BG_TRAINING}, got {bg_training!r}")
        self.bg_training = bg_training
        if level_order not in LEVEL_ORDERS:
            raise ValueError(f"level_order must be one of {LEVEL_ORDERS}, got {level_order!r}")
        if box_noise not in BOX_NOISE:
            raise ValueError(f"box_noise must be one of {BOX_NOISE}, got {box_noise!r}")
        if cond_over_budget not in ("one_group", "none"):
            raise ValueError(f"cond_over_budget must be 'one_group' or 'none', got {cond_over_budget!r}")
        self.box_noise, self.cond_over_budget = box_noise, cond_over_budget
        self.hidden_dim, self.num_heads = hidden_dim, num_heads
        self.decoupled, self.conditioned, self.level_order = decoupled, conditioned, level_order
        self.num_fg = num_fg if decoupled else num_fg + num_bg
        self.num_bg = num_bg if decoupled else 0
        self.cond_budget, self.box_noise_scale, self.anchor_size = cond_budget, box_noise_scale, anchor_size
        # language-guided foreground selection on encoder tokens (scored and boxed by the shared heads below)
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_norm = nn.LayerNorm(hidden_dim)
        # background queries
        if self.num_bg:
            self.bg_content = nn.Embedding(self.num_bg, hidden_dim)
            self.bg_anchor = nn.Embedding(self.num_bg, 4)
            anchors = torch.rand(self.num_bg, 4) * torch.tensor([1.0, 1.0, 0.6, 0.6]) + torch.tensor([0, 0, 0.2, 0.2])
            self.bg_anchor.weight.data.copy_(inverse_sigmoid(anchors.clamp(0.01, 0.99)))
        # conditioned queries: content = text embedding x a learned map (no bias, as the reference's lang_mapper)
        if conditioned:
            self.cond_content = nn.Linear(text_dim, hidden_dim, bias=False)
        self.ref_point_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, num_levels, num_heads, num_points, ffn_dim, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.class_head = TextClassifier(hidden_dim, text_dim, logit_scale_init, bias=class_bias)
        self.box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.mask_head = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)

    # ------------------------------------------------------------------------------------------------ queries
    def _in_level_order(self, memory: EncoderMemory) -> EncoderMemory:
        """The memory with its levels in the decoder's order (see the module docstring)."""
        if self.level_order == "fine_first":
            return memory
        sizes = memory.spatial_shapes.prod(1).tolist()
        reverse = lambda x: torch.cat(x.split(sizes, 1)[::-1], 1)  # noqa: E731
        shapes = memory.spatial_shapes.flip(0)
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        padding = None if memory.padding_mask is None else reverse(memory.padding_mask)
        return replace(memory, memory=reverse(memory.memory), padding_mask=padding, spatial_shapes=shapes,
                       level_start_index=starts)

    def _anchors(self, memory: EncoderMemory) -> tuple[Tensor, Tensor]:
        """Unsigmoided anchor boxes [S, 4] at every token's cell and which tokens may propose [B, S]."""
        anchors = []
        for level, (height, width) in enumerate(memory.spatial_shapes.tolist()):
            centres = grid_positions(height, width, memory.memory.device)
            size = torch.full_like(centres, self.anchor_size * 2.0**level)
            anchors.append(torch.cat([centres, size], -1))
        anchors = torch.cat(anchors, 0)
        inside = ((anchors > 0.01) & (anchors < 0.99)).all(-1)[None]
        valid = inside.expand(memory.memory.shape[0], -1)
        if memory.padding_mask is not None:
            valid = valid & ~memory.padding_mask
        return inverse_sigmoid(anchors), valid

    def select_foreground(self, memory: EncoderMemory, text: Tensor) -> tuple[Tensor, Tensor]:
        """Top-``num_fg`` encoder tokens by their best text similarity.

        Returns (content [B, F, D], unsigmoided proposal boxes [B, F, 4]), both undetached.
        """
        anchors, valid = self._anchors(memory)
        if int(valid.sum(1).min()) < self.num_fg:
            raise ValueError(f"only {int(valid.sum(1).min())} encoder tokens can propose boxes but {self.num_fg} "
                             "foreground queries are asked for: use larger images or fewer queries")
        features = self.enc_norm(self.enc_output(memory.memory.masked_fill(~valid[..., None], 0.0)))
        scores = self.class_head(features, text).max(-1).values.masked_fill(~valid, float("-inf"))
        index = scores.topk(self.num_fg, dim=1).indices
        content = torch.gather(features, 1, index[..., None].expand(-1, -1, features.shape[-1]))
        # the box MLP acts on each token alone: running it on the selected tokens only gives the same boxes
        return content, self.box_head(content) + anchors[index]

    def _group_counts(self, conditions: Conditions) -> tuple[int, int, int]:
        """(noisy groups, clean groups, slots per group) that ``conditions`` give (see ``cond_over_budget``)."""
        slots = max([1] + [len(labels) for labels in conditions.labels])
        noisy = conditions.num_groups
        if noisy is None:
            noisy = self.cond_budget // slots
            if noisy == 0 and self.cond_over_budget == "one_group":
                noisy = 1
        return noisy, int(conditions.clean_group), slots

    def _conditioned_queries(self, conditions: Conditions, text: Tensor, batch: int
                             ) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """Content [B, G*M, D], unsigmoided reference boxes [B, G*M, 4], target index [B, G*M] (-1 = padding), G,
        M. (The boxes pass through ``inverse_sigmoid``, whose clamp keeps a box side of 1 just inside the image, as
        in the reference.)"""
        device = text.device
        noisy_groups, clean, slots = self._group_counts(conditions)
        groups = noisy_groups + clean
        content = text.new_zeros(batch, groups * slots, self.hidden_dim)
        boxes = inverse_sigmoid(text.new_tensor([0.5, 0.5, 0.1, 0.1])).repeat(batch, groups * slots, 1)
        target_index = torch.full((batch, groups * slots), -1, dtype=torch.long, device=device)
        projected = self.cond_content(text)  # [K, D]: one projection per class, shared by all its boxes
        for i, (labels, image_boxes) in enumerate(zip(conditions.labels, conditions.boxes)):
            count = len(labels)
            if count == 0:
                continue
            # slots of this image's boxes in every group, group-major: g * slots + j
            index = (torch.arange(groups, device=device)[:, None] * slots
                     + torch.arange(count, device=device)[None]).flatten()
            noisy = image_boxes.to(device, text.dtype).repeat(groups, 1)
            if conditions.add_noise and self.box_noise_scale > 0:  # the clean group (first) keeps its boxes
                noisy[clean * count:] = noisy_boxes(noisy[clean * count:], self.box_noise_scale, self.box_noise)
            content[i, index] = projected[labels.to(device)].repeat(groups, 1)
            boxes[i, index] = inverse_sigmoid(noisy)
            target_index[i, index] = torch.arange(count, device=device).repeat(groups)
        return content, boxes, target_index, groups, slots

    def _attention_mask(self, target_index: Tensor, groups: int, slots: int, num_matching: int) -> Tensor:
        """bool [B * heads, Q, Q], True = may not attend (see module docstring)."""
        batch = target_index.shape[0]
        num_cond = groups * slots
        total = num_cond + num_matching
        group_of = torch.arange(num_cond, device=target_index.device) // slots
        blocked = torch.zeros(total, total, dtype=torch.bool, device=target_index.device)
        blocked[num_cond:, :num_cond] = True
        blocked[:num_cond, :num_cond] = group_of[:, None] != group_of[None, :]
        blocked = blocked[None].repeat(batch, 1, 1)
        padding = target_index < 0  # [B, G*M]
        blocked[:, :, :num_cond] |= padding[:, None, :]
        diagonal = torch.arange(num_cond, device=target_index.device)
        blocked[:, diagonal, diagonal] = False  # a padding slot sees itself (no empty softmax row)
        return blocked.repeat_interleave(self.num_heads, dim=0)

    # ------------------------------------------------------------------------------------------------ forward
    def _predict(self, tgt: Tensor, boxes: Tensor, text: Tensor, mask_features: Tensor,
                 masks: bool = True) -> Prediction:
        """Logits and (unless ``masks`` is False) masks from ``norm(tgt)`` (the shared heads), with the given boxes."""
        hidden = self.norm(tgt)
        return Prediction(self.class_head(hidden, text), boxes,
                          self._mask_logits(hidden, mask_features) if masks else None)

    def _mask_logits(self, hidden: Tensor, mask_features: Tensor) -> Tensor:
        return torch.einsum("bqc,bchw->bqhw", self.mask_head(hidden), mask_features)

    def forward(self, memory: EncoderMemory, text: Tensor, conditions: Conditions | None = None,
                masks: str = "all") -> Outputs:
        """memory: the pixel decoder's output; text: [K, text_dim] embeddings of the vocabulary; masks: which
        predictions carry masks, ``"all"``, ``"final"`` or ``"prompts"`` (see the module docstring; the others'
        ``masks`` are None)."""
        if conditions is not None and not self.conditioned:
            raise ValueError("conditions given to a decoder built with conditioned=False")
        if masks not in MASK_MODES:
            raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
        every = masks == "all"
        mask_features = memory.mask_features
        memory = self._in_level_order(memory)
        batch = memory.memory.shape[0]
        proposal_content, proposal_boxes = self.select_foreground(memory, text)
        contents, boxes = [proposal_content.detach()], [proposal_boxes.detach()]  # boxes unsigmoided
        if self.num_bg and self.bg_training == "reference" and self.training:
            # the reference's proposals ("interm" outputs) carry the bg queries: their content through the heads,
            # their anchors as the boxes; this is what trains them (they enter the decoder detached, below)
            bg_content = self.bg_content.weight[None].expand(batch, -1, -1)
            bg_anchor = self.bg_anchor.weight[None].expand(batch, -1, -1)
            proposals = self._predict(torch.cat([proposal_content, bg_content], 1),
                                      torch.cat([proposal_boxes, bg_anchor], 1).sigmoid(), text, mask_features, every)
        else:
            proposals = self._predict(proposal_content, proposal_boxes.sigmoid(), text, mask_features, every)
        if self.num_bg:
            bg_content = self.bg_content.weight[None].expand(batch, -1, -1)
            bg_anchor = self.bg_anchor.weight[None].expand(batch, -1, -1)
            if self.bg_training == "reference":  # trained through the proposals only
                bg_content, bg_anchor = bg_content.detach(), bg_anchor.detach()
            contents.append(bg_content)
            boxes.append(bg_anchor)
        num_matching = self.num_fg + self.num_bg
        attn_mask, num_cond, cond = None, 0, None
        if conditions is not None and sum(self._group_counts(conditions)[:2]) == 0:
            conditions = None  # every image over the budget and cond_over_budget="none": no conditioned queries
        if conditions is not None:
            cond_content, cond_boxes, target_index, groups, slots = self._conditioned_queries(conditions, text, batch)
            contents.insert(0, cond_content)
            boxes.insert(0, cond_boxes)
            num_cond = groups * slots
            attn_mask = self._attention_mask(target_index, groups, slots, num_matching)
        tgt = torch.cat(contents, 1)
        # bg_training="openseed": the background anchors are undetached here and learn through the first layer's
        # loss boxes ("look forward twice"); "reference": detached above, trained through the proposals instead
        reference = torch.cat(boxes, 1).sigmoid()
        predictions = [self._predict(tgt, reference, text, mask_features, every or not self.layers)]
        reference_in = reference.detach()
        for index, layer in enumerate(self.layers):
            query_pos = self.ref_point_head(sine_embedding(reference_in, self.hidden_dim // 2))
            tgt = layer(tgt, query_pos, reference_in, memory, attn_mask)
            hidden = self.norm(tgt)
            loss_boxes = (self.box_head(hidden) + inverse_sigmoid(reference)).sigmoid()
            reference = (self.box_head(tgt) + inverse_sigmoid(reference_in)).sigmoid()
            reference_in = reference.detach()
            last = index == len(self.layers) - 1
            predictions.append(self._predict(hidden, loss_boxes, text, mask_features,
                                             every or (last and masks == "final")))
        matching = [_slice(p, num_cond, num_cond + num_matching) for p in predictions]
        if conditions is not None:
            cond_predictions = [_slice(p, 0, num_cond) for p in predictions]
            if masks == "prompts":  # the last layer's masks of the conditioned queries alone
                last_hidden = self.norm(tgt[:, :num_cond]) if self.layers else tgt[:, :num_cond]
                cond_predictions[-1] = replace(cond_predictions[-1],
                                               masks=self._mask_logits(self.norm(last_hidden), mask_features))
            cond = ConditionedOutputs(cond_predictions, target_index, groups, clean_group=conditions.clean_group)
        return Outputs(final=matching[-1], aux=matching[:-1], proposals=proposals, conditioned=cond,
                       num_fg=self.num_fg, num_bg=self.num_bg, mask_features=mask_features)


def _slice(prediction: Prediction, start: int, stop: int) -> Prediction:
    return Prediction(prediction.logits[:, start:stop], prediction.boxes[:, start:stop],
                      None if prediction.masks is None else prediction.masks[:, start:stop])


def noisy_boxes(boxes: Tensor, scale: float, kind: str = "corners") -> Tensor:
    """cxcywh boxes with training noise: ``jitter_boxes`` ("corners") or the reference's ("reference": centre +
    U(-1, 1) x scale x side / 2, width and height + U(-1, 1) x scale x side, each value clamped to [0, 1])."""
    if kind == "corners":
        return jitter_boxes(boxes, scale)
    spread = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], -1)
    return (boxes + (torch.rand_like(boxes) * 2 - 1) * spread * scale).clamp(0, 1)


def jitter_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Move each corner of cxcywh boxes by up to ``scale`` x half the box size, uniformly (DN-DETR box noise)."""
    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], -1)
    half = boxes[:, 2:].repeat(1, 2) / 2
    xyxy = (xyxy + (torch.rand_like(xyxy) * 2 - 1) * half * scale).clamp(0, 1)
    low, high = torch.minimum(xyxy[:, :2], xyxy[:, 2:]), torch.maximum(xyxy[:, :2], xyxy[:, 2:])
    size = (high - low).clamp(min=1e-3)
    return torch.cat([(low + high) / 2, size], -1)
