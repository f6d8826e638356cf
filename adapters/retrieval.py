"""The multi-vector retriever adapter: transformers' ``ColPaliForRetrieval`` and
``ColQwen2ForRetrieval`` (the rows of :data:`FLAVOURS`, matched by ``config.model_type``).

One stage, ``output`` (CORE-V2 "multi-vector retriever", role ``output``): the page's patch
embeddings after the model's projection and L2 normalisation, the vectors late interaction
(MaxSim) reads; the ones a method keeps are the document's index. Boundary-role methods
(DivPrune, uniform, random) act there through ``default_points["boundary"]``. Only a call with
``pixel_values`` (a document) is pruned; a query (text only) passes through untouched.

Mechanics (hooks only): a pre-hook of the model reads ``input_ids``, ``attention_mask`` and the
image grid; a forward hook runs the method on each document's image-token embeddings
(``ctx.tokens [B, N, D]``, raster order; rows of different grids one at a time) and returns
``embeddings`` holding, per row and in sequence order, the attended text tokens and the kept
patches (a merging method's values at its kept patches' places), zero rows after them as
padding. Zero rows are the model's own padding convention (it multiplies by the attention
mask), and :func:`vlmprune.retrieval.maxsim` masks them out. Signals: ``hidden`` /
``projected`` (the patch embeddings) and ``received_attention`` (``[B, N]``: the attention each patch
receives in the last decoder layer from the document prompt's text tokens that follow the image,
mean over heads and those tokens: the salience HPC-ColPali's card suggests, "attention from the
query tokens"; needs ``attn_implementation="eager"``). Only the tokens after the image see every
patch under a causal mask: a mean over all positions favoured the first patches (measured on the
embedded retriever: of 102 patches kept, 99 in the top two quadrants). Cost: bytes per document
of the kept vectors (``handle.stats["bytes_per_document"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmprune.context import ModelInfo, Point, Signals, StageSpec
from vlmprune.method import Method

from .base import Adapter, Installed, Plan, read_arg, register_adapter
from .runtime import Runtime

SIGNALS = ("hidden", "projected", "received_attention")
#: rows may keep different counts (padded with zero rows); a merge writes at its kept places
STAGE = StageSpec("output", "output", signals=frozenset(SIGNALS), ragged=True)


@dataclass(frozen=True)
class Flavour:
    """One retriever class: ``image_token`` reads the image token id from the config;
    ``grids`` returns each row's patch grid ``(rows, cols)`` from the call's keyword
    arguments (``None`` arguments: the config's fixed grid, None where it has none)."""

    name: str
    image_token: Any
    grids: Any


def _paligemma_grid(model, kwargs=None, batch=1):
    vision = model.config.vlm_config.vision_config
    side = vision.image_size // vision.patch_size
    return [(side, side)] * batch


def _qwen_grid(model, kwargs=None, batch=1):
    if kwargs is None:
        return None
    thw = kwargs.get("image_grid_thw")
    if thw is None:
        raise ValueError("a ColQwen2 document call needs 'image_grid_thw' (the processor's output)")
    merge = model.config.vlm_config.vision_config.spatial_merge_size
    return [(int(t) * int(h) // merge, int(w) // merge) for t, h, w in thw.tolist()]


FLAVOURS = {
    "colpali": Flavour("colpali", lambda c: c.vlm_config.image_token_id, _paligemma_grid),
    "colqwen2": Flavour("colqwen2", lambda c: c.vlm_config.image_token_id, _qwen_grid),
}


@register_adapter
class RetrievalAdapter(Adapter):
    model_types = tuple(FLAVOURS)
    stages = ("output",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.flavour = FLAVOURS[model.config.model_type]
        self.image_token = self.flavour.image_token(model.config)

    def info(self) -> ModelInfo:
        grids = self.flavour.grids(self.model)
        grid = grids[0] if grids else None
        point = Point("output")
        return ModelInfo(
            family="retrieval",
            stages={"output": STAGE},
            default_points={"boundary": point, "output": point},
            grid=grid,
            n_tokens=grid[0] * grid[1] if grid else None,
            signals=SIGNALS,
        )

    @property
    def last_attention(self) -> nn.Module:
        """The last decoder layer's attention module (both flavours: ``vlm.language_model``)."""
        return self.model.vlm.language_model.layers[-1].self_attn

    def check_plan(self, method: Method, points: list[Point]) -> None:
        if "received_attention" in method.needs and self.model.config._attn_implementation != "eager":
            raise ValueError(
                f"method {method.name!r} reads signal 'received_attention' (the last decoder layer's attention weights), which "
                "needs attn_implementation='eager' on the retriever (model.set_attn_implementation('eager'))"
            )

    def install(self, plan: Plan) -> Installed:
        installed = Installed()
        rt = RetrievalRuntime(plan, self.info(), self)
        installed.hook(self.model.register_forward_pre_hook(rt.start, with_kwargs=True))
        installed.hook(self.model.register_forward_hook(rt.finish, with_kwargs=True))
        if "received_attention" in plan.method.needs:
            installed.hook(self.last_attention.register_forward_hook(rt.keep_attention))
        self.runtime = rt
        return installed

    def cost(self, stats) -> dict[str, Any]:
        """Bytes per document of the kept patch vectors (fp values as the model stores them;
        text tokens of the document prompt not counted)."""
        points = stats.points
        if not points:
            return {}
        proj = self.model.embedding_proj_layer.weight
        return {"bytes_per_document": [n * proj.shape[0] * proj.element_size() for n in points[-1]["out"]]}


class RetrievalRuntime(Runtime):
    """One document forward: its ids, attention mask and grids (set by :meth:`start`; None for a
    query) and the last layer's attention weights when the method reads them."""

    def __init__(self, plan: Plan, info: ModelInfo, adapter: RetrievalAdapter):
        super().__init__(plan, info)
        self.adapter = adapter
        self.call: dict | None = None
        self.weights: torch.Tensor | None = None

    def start(self, module, args, kwargs) -> None:
        pixels = read_arg(args, kwargs, "pixel_values", 1)
        if pixels is None:
            self.call = None  # a query: never pruned
            return
        ids = read_arg(args, kwargs, "input_ids", 0)
        if ids is None:
            raise ValueError("a document call needs 'input_ids' (to find the image tokens); inputs_embeds alone is not supported")
        mask = read_arg(args, kwargs, "attention_mask", 2)
        grids = self.adapter.flavour.grids(self.adapter.model, kwargs, ids.shape[0])
        self.call = {"ids": ids, "mask": torch.ones_like(ids) if mask is None else mask, "grids": grids}
        self.weights = None
        self.begin(grids[0][0] * grids[0][1], grids[0], ids.device)

    def keep_attention(self, module, args, output) -> None:
        if self.call is not None:
            weights = output[1] if isinstance(output, tuple) else None
            if weights is None:
                raise RuntimeError("the last decoder layer returned no attention weights: run the retriever with eager attention")
            self.weights = weights.detach()

    def _attention(self, rows: list[int], image: torch.Tensor) -> torch.Tensor:
        """``[len(rows), N]``: attention each image token receives from the attended text tokens
        after the row's last image token, mean over heads and those tokens."""
        mask = self.call["mask"][rows].bool()
        pos = torch.arange(image.shape[1], device=image.device)
        last = torch.where(image, pos, -1).amax(1, keepdim=True)
        queries = (mask & (pos > last)).to(self.weights.dtype)
        if bool((queries.sum(1) == 0).any()):
            raise ValueError("received_attention reads the document prompt's text tokens after the image; "
                             "a document row has none")
        received = (self.weights[rows].mean(1) * queries[:, :, None]).sum(1) / queries.sum(1, keepdim=True)
        return torch.stack([received[j][image[j]] for j in range(len(rows))])

    def finish(self, module, args, kwargs, output):
        if self.call is None:
            return None
        ids, mask, grids = self.call["ids"], self.call["mask"], self.call["grids"]
        emb = output.embeddings
        image = (ids == self.adapter.image_token) & mask.bool()
        counts = image.sum(1).tolist()
        for i, (r, c) in enumerate(grids):
            if counts[i] != r * c:
                raise RuntimeError(f"document {i} holds {counts[i]} image tokens, its grid {r} x {c} wants {r * c}")
        groups = [list(range(len(grids)))] if len(set(grids)) == 1 else [[i] for i in range(len(grids))]
        kept = [None] * len(grids)
        for rows in groups:
            self.grid, self.n_visual = grids[rows[0]], counts[rows[0]]
            tokens = torch.stack([emb[i][image[i]] for i in rows])
            signals = {"hidden": lambda t=tokens: t, "projected": lambda t=tokens: t}
            if self.weights is not None:
                signals["received_attention"] = lambda rows=rows: self._attention(rows, image[rows])
            index = torch.arange(tokens.shape[1], device=tokens.device).expand(len(rows), -1)
            images = None if len(groups) == 1 else rows
            sel = self.run(Point("output"), tokens, index, Signals(signals), images=images).selection
            for j, (keep, merged, _) in enumerate(sel.per_image()):
                kept[rows[j]] = (keep, merged)
        if len(groups) > 1:
            self.stats.points[-len(groups):] = [_joined(self.stats.points[-len(groups):])]
        output.embeddings = pack(emb, image, mask.bool(), kept)
        return output


def pack(emb: torch.Tensor, image: torch.Tensor, attended: torch.Tensor, kept: list) -> torch.Tensor:
    """Each row's attended text tokens and kept patches, in sequence order (a kept patch's
    ``merged`` value in place of its own), padded with zero rows to the longest."""
    rows = []
    for i, (keep, merged) in enumerate(kept):
        row = emb[i].clone()
        where = image[i].nonzero()[:, 0]
        stay = attended[i] & ~image[i]
        stay[where[keep.to(where.device)]] = True
        if merged is not None:
            row[where[keep.to(where.device)]] = merged.to(row.dtype)
        rows.append(row[stay])
    longest = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])


def _joined(records: list[dict]) -> dict:
    """Stats entries of one point called once per document, as one entry."""
    return {"point": records[0]["point"], "in": [v for r in records for v in r["in"]], "out": [v for r in records for v in r["out"]]}
