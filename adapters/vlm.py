"""What every VLM adapter's runtime shares: finding image spans in the prompt, handing the
LM-input keep mask to the decoder, labels, the text-embedding signal. A family adapter adds
``image_features()`` (its own vision path) and sets ``self.images``: one :class:`ImageRecord`
per image."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from vlmprune.context import ModelInfo, Point
from vlmprune.method import Method

from .base import AdapterOption, Installed, Plan
from .decoder import Decoder, DecoderPruner, VisualLayout, _mask_4d, _padding_of
from .runtime import Runtime


@dataclass
class ImageRecord:
    """One image's tokens at the LM input (``VLMRuntime.images``, set by the family's
    ``image_features()``): they fill the first ``count`` of the image's ``slots`` placeholder
    tokens; ``raster`` ``[count]``: each one's raster index in the image's grid (-1: no single
    origin, e.g. CLS or an appended token); ``offset``: slots before the first grid token in the
    unpruned span (LLaVA's CLS slot)."""

    count: int
    raster: torch.Tensor
    slots: int
    offset: int = 0


@dataclass
class PrefillRecord:
    """What the runtime hands the decoder at a prefill with images (:meth:`VLMRuntime.take_record`):
    ``keep`` ``[B, L]``: the LM-input positions that stay (unused placeholder slots go);
    ``pos_source`` ``[B, L]``: the position whose id each takes under ``positions="original"``;
    ``layout``: where each image's visual tokens sit; ``positions``: the numbering
    (:func:`position_options`)."""

    keep: torch.Tensor
    pos_source: torch.Tensor
    layout: VisualLayout
    positions: str


#: numberings of kept visual tokens (the ``positions`` and ``llm_positions`` options)
POSITIONS = ("compact", "original")


def position_options(offered: tuple[str, ...] | None = None) -> dict[str, AdapterOption]:
    """The LLaVA-family adapter options (``wrap(model, m, budget, positions=..., llm_positions=...)``);
    ``offered``: the numberings the adapter gives (None: both)."""
    return {
        "positions": AdapterOption(
            POSITIONS,
            "how the tokens a method removes before the LLM leave the others numbered: 'compact' "
            "(renumbered, as LLaVA implementations of VisionZip and the like do) or 'original' (each "
            "kept token keeps its unpruned position id); None: the method's choice (Method.positions)",
            offered=offered,
            stages=("encoder", "projector"),
            unused="numbers tokens removed before the LLM; method {method!r} prunes only inside the LLM; "
            "number the tokens it keeps there with parameter 'llm_positions'",
        ),
        "llm_positions": AdapterOption(
            POSITIONS,
            "the same for the tokens kept at points inside the LLM, from each point on ('compact': "
            "renumbered, with the new tokens' positions shifted at decode as TransPrune's and "
            "AdaToken-3D's code do; 'original': FastV's); None: the method's choice (Method.llm_positions)",
            offered=offered,
            stages=("llm",),
            unused="numbers tokens kept inside the LLM; method {method!r} has no point inside the LLM "
            "(see parameter 'positions')",
        ),
    }


def check_llm_attention(model: nn.Module, method: Method, points: list[Point]) -> None:
    """:meth:`Adapter.check_plan` of the VLM adapters: points inside the LLM need its attention
    to be SDPA or eager (the decoder hooks gather masks and RoPE tables those two read)."""
    if not any(p.stage == "llm" for p in points):
        return
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    text_impl = getattr(getattr(model.config, "text_config", None), "_attn_implementation", None) or impl
    if text_impl not in ("sdpa", "eager"):
        raise ValueError(
            f"method {method.name!r} prunes inside the LLM, which vlmprune supports with "
            f"attn_implementation 'sdpa' or 'eager'; this model uses {text_impl!r}"
        )


class VLMRuntime(Runtime):
    #: keyword of the model's forward that carries images
    pixel_key = "pixel_values"
    #: the decoder mechanics this family installs (the VLA adapter adds its decode capture)
    decoder_class = DecoderPruner

    def __init__(self, plan: Plan, info: ModelInfo, adapter):
        super().__init__(plan, info)
        self.adapter = adapter
        self.image_mask: torch.Tensor | None = None
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.images: list[ImageRecord] | None = None
        self.slots: list[int] = []  # placeholder tokens per image of the current prefill
        self.labels: torch.Tensor | None = None
        self.decoder: DecoderPruner | None = None
        #: inside generate(): the image records of its prompt (re-used by its no-cache steps)
        self.generation_images: list[ImageRecord] | None = None
        #: inside generate(): (pixel_values, image_features() output) of its prompt
        self._encoded: tuple | None = None

    def positions_mode(self) -> str:
        return self.plan.adapter_options.get("positions") or self.method.positions

    def llm_positions_mode(self) -> str:
        """Numbering after ``llm`` points: ``wrap(llm_positions=...)``, else the method's choice
        where the adapter offers it, else original positions."""
        mode = self.plan.adapter_options.get("llm_positions") or self.method.llm_positions
        return mode if mode in self.adapter.options["llm_positions"].available else "original"

    def install_common(self, installed: Installed, decoder: Decoder, core: nn.Module, top: nn.Module) -> None:
        """What every VLM adapter installs: the decoder hooks for ``llm`` points, the model-level
        input hook, the adapter's own ``get_image_features`` and (on the top model) labels."""
        llm_points = [p for p in self.plan.points if p.stage == "llm"]
        llm_capture = tuple(sorted(self.plan.capture.get("llm", ()))) if llm_points else ()
        self.decoder = self.decoder_class(decoder, self, llm_points, llm_capture)
        self.decoder.install(installed)
        installed.hook(core.register_forward_pre_hook(self.on_model_input, with_kwargs=True))
        installed.set_attribute(core, "get_image_features", self._encode_once())
        self._install_generate_inputs(installed, top)
        if top is not core:
            installed.hook(top.register_forward_pre_hook(self.on_top_input, with_kwargs=True))
            installed.hook(top.register_forward_hook(self.on_top_output, with_kwargs=True))

    def _encode_once(self):
        """``image_features()`` (signature kept: generate() reads it), run once per generate()
        call: transformers < 5.2x passes the same ``pixel_values`` at every no-cache step, which
        then get the first step's features and image records (the method does not run again)."""

        @functools.wraps(self.image_features)
        def features(pixel_values, *args, **kwargs):
            done = self._encoded
            if done is not None and done[0] is pixel_values and self.generation_images is not None:
                self.images = self.generation_images
                return done[1]
            out = self.image_features(pixel_values, *args, **kwargs)
            if self.decoder.generating:
                self._encoded = (pixel_values, out)
            return out

        return features

    def _install_generate_inputs(self, installed: Installed, top: nn.Module) -> None:
        """Wraps ``generate()``. transformers >= 5.2x encodes the images through
        ``image_features()`` once, before the first forward, so the prompt's ids (for the
        ``text_embedding`` signal) are recorded when ``generate()`` is called, and the image
        records are kept for its no-cache steps (which get the same pre-encoded features at every
        step). ``num_beams`` / ``num_return_sequences`` repeat each prompt (and, there, its
        encoded images, see ``repeat_images``). Every no-cache step after the first replays the
        first step's choices (:class:`.llm.FirstStep`)."""
        original = getattr(top, "generate", None)
        if original is None:
            return
        core = self.adapter.core

        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor) and ids.dim() == 2:
                self.input_ids = ids
                self.attention_mask = kwargs.get("attention_mask")
                self.image_mask = ids == core.config.image_token_id
            self.decoder.begin_generation()
            try:
                return original(*args, **kwargs)
            finally:
                self.decoder.end_generation()
                self.generation_images = self._encoded = None

        installed.set_attribute(top, "generate", generate)
        expand = getattr(top, "_expand_inputs_for_generation", None)
        if expand is None:
            return

        def expand_inputs(*args, **kwargs):
            size = kwargs.get("expand_size", args[0] if args else 1)
            ids = kwargs.get("input_ids")
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None
            if size > 1 and encoded and self.images is not None and isinstance(ids, torch.Tensor):
                self.repeat_images(ids == core.config.image_token_id, size)
            return expand(*args, **kwargs)

        installed.set_attribute(top, "_expand_inputs_for_generation", expand_inputs)

    def repeat_images(self, image_mask: torch.Tensor, size: int) -> None:
        """generate() repeats each prompt ``size`` times in a row (beams, returned sequences) and,
        with images encoded before the loop, each prompt's group of encoded images with it: the
        image records (and per-image lists) follow, in that order."""
        rows = [row for row, _ in self._spans(image_mask, [img.slots for img in self.images])]
        order = [i for row in range(image_mask.shape[0]) for _ in range(size) for i, r in enumerate(rows) if r == row]
        self.images = [self.images[i] for i in order]
        self.slots = [self.slots[i] for i in order]
        # what a method kept per image at the vision side (VFlowOpt's importance map, read again
        # inside the LLM) follows its image into every copy, each copy with its own state
        self.image_states = {j: copy.deepcopy(self.image_states[i]) for j, i in enumerate(order) if i in self.image_states}
        if getattr(self, "image_grids", None) is not None:  # LLaVA-NeXT's, Qwen-VL's
            self.image_grids = [self.image_grids[i] for i in order]

    # -- model-level hooks ---------------------------------------------------------------------------
    def on_model_input(self, module, args, kwargs):
        core = self.adapter.core
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        pre_encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None
        self.input_ids = input_ids
        self.attention_mask = kwargs.get("attention_mask")
        mask4d = _mask_4d(self.attention_mask)
        if mask4d is not None:  # a static cache's prefill (transformers 5.17): its padding, in 2-D
            self.attention_mask = _padding_of(mask4d, mask4d.shape[-2])
        self.image_mask = None
        if kwargs.get(self.pixel_key) is None and not pre_encoded:
            self.images = None  # no image this call: an image-token id here is an ordinary token
            return
        if not pre_encoded:
            self.images = None  # image_features() runs inside this forward
        elif self.images is None:  # a later no-cache step of generate(): the same encoded images
            self.images = self.generation_images
        # else: generate() (transformers >= 5.2x) encoded the images through image_features()
        # just before this prefill; its records are still in self.images
        image_id = core.config.image_token_id
        if input_ids is not None:
            self.image_mask = input_ids == image_id
        else:
            ref = core.get_input_embeddings()(torch.tensor(image_id, device=embeds.device))
            self.image_mask = (embeds == ref).all(-1)
        return

    def on_top_input(self, module, args, kwargs):
        self.labels = kwargs.pop("labels", None)
        return args, kwargs

    def on_top_output(self, module, args, kwargs, output):
        labels, self.labels = self.labels, None
        if labels is None:
            return output
        st = self.decoder.state
        for t in ([st.input_transform] if st.input_transform else []) + [t for _, t in sorted(st.layer_transforms.items())]:
            labels = t.seq(labels).masked_fill(~t.valid, -100)
        output.loss = module.loss_function(logits=output.logits, labels=labels, vocab_size=module.config.text_config.vocab_size)
        return output

    def _text_embedding(self):
        """LLM input embeddings of each image's prompt text: ``(emb [n_img, T, D], mask [n_img, T])``."""
        if self.input_ids is None:
            raise KeyError("text_embedding needs input_ids")
        core = self.adapter.core
        rows = self._image_rows()
        text = ~self.image_mask
        if self.attention_mask is not None:
            text &= self.attention_mask.bool()
        emb = core.get_input_embeddings()(self.input_ids)
        longest = int(text.sum(1).max())
        out = emb.new_zeros(len(rows), longest, emb.shape[-1])
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=emb.device)
        for i, row in enumerate(rows):
            sel = emb[row][text[row]]
            out[i, : sel.shape[0]] = sel
            mask[i, : sel.shape[0]] = True
        return out, mask

    @staticmethod
    def _spans(mask: torch.Tensor, slots: list[int]) -> list[tuple[int, int]]:
        """(row, start) of each image's placeholder span (``slots[i]`` long), in feature order."""
        spans, i = [], 0
        for row in range(mask.shape[0]):
            positions = mask[row].nonzero().flatten().tolist()
            j = 0
            while j < len(positions):
                if i >= len(slots):
                    raise RuntimeError(f"vlmprune: more image placeholders in the prompt than {len(slots)} images")
                spans.append((row, positions[j]))
                j += slots[i]
                i += 1
        if i != len(slots):
            raise RuntimeError(f"vlmprune: {i} image spans in the prompt for {len(slots)} images")
        return spans

    def _image_rows(self) -> list[int]:
        return [row for row, _ in self._spans(self.image_mask, self.slots)]

    # -- handed to the decoder's input hook ----------------------------------------------------------
    def _place_image(self, img: ImageRecord, row: int, start: int, pos_source: torch.Tensor):
        """One image whose kept tokens fill the first slots of its placeholder span (from ``start``
        in ``row``): set where each takes its position id from in ``pos_source``; return the
        sequence positions of its visual tokens, their raster indices and the image's token total."""
        visual = torch.arange(start, start + img.count, device=pos_source.device)
        raster = img.raster
        pos_source[row, visual] = torch.where(raster >= 0, start + img.offset + raster, start)
        return visual, raster, img.slots - img.offset

    def take_record(self) -> PrefillRecord | None:
        """The LM-input keep mask, position sources and visual layout of this prefill."""
        mask, images = self.image_mask, self.images
        self.image_mask, self.images = None, None
        if mask is None:
            return None
        if self.decoder.generating:
            self.generation_images = images
        if images is None:
            raise RuntimeError(
                "vlmprune: image tokens reached the language model without pixel_values passing through the "
                "adapter (precomputed mm_encoder_outputs bypass it); pass pixel_values"
            )
        b, length = mask.shape
        device = mask.device
        spans = self._spans(mask, [img.slots for img in images])
        keep = torch.ones(b, length, dtype=torch.bool, device=device)
        pos_source = torch.arange(length, device=device).expand(b, -1).clone()
        rows, positions, rasters, totals = [], [], [], []
        for (row, start), img in zip(spans, images):
            keep[row, start + img.count : start + img.slots] = False
            visual, raster, total = self._place_image(img, row, start, pos_source)
            rows.append(row)
            positions.append(visual)
            rasters.append(raster)
            totals.append(total)
        layout = VisualLayout(torch.tensor(rows, device=device), positions, rasters, totals)
        return PrefillRecord(keep, pos_source, layout, self.positions_mode())
