"""VFlowOpt: a ViT importance map, post-projector pruning with recycling, progressive LLM-stage
pruning with the same map, and hyper-parameters from a flow-guided search."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..context import Point, Selection, TokenContext
from ..method import Method, _check_option, option, scale_llm_layers
from ..primitives.merging import recycle_by_cell
from ..primitives.scoring import context_relevance, histogram_entropy
from ..primitives.selection import topk_keep_order
from ..registry import register

#: The configs released with the official code (``lmms_eval/models/llava_onevision_training_free.py``;
#: LLaVA-OneVision-7B, ViT layer 25, LLM stages before layers 9 and 18 of 28), keyed by the average
#: fraction of visual tokens they keep over the LLM layers.
RELEASED = {
    0.50: dict(t=28.68, m=11.76, r_v=0.7233, r_1=0.7487, r_2=0.487, alpha_v=0.0),
    0.25: dict(t=34.76, m=15.58, r_v=0.2651, r_1=0.9833, r_2=0.8773, alpha_v=0.0),
    0.10: dict(t=39.26, m=17.39, r_v=0.1166, r_1=1.0, r_2=0.6011, alpha_v=0.0),
}
#: The hyper-parameters the flow-guided search tunes (``r_2`` always follows from the budget).
SEARCHED = ("r_v", "r_1", "t", "m", "alpha_v")
_CONFIG_KEYS = ("method", "options", "calibration")


def layer_average(r_v: float, r_1: float, r_2: float, layers: tuple[int, int], depth: int) -> float:
    """Average fraction of visual tokens per LLM layer: ``r_v`` before ``layers[0]``,
    ``r_v r_1`` up to ``layers[1]``, ``r_v r_1 r_2`` after (VFlowOpt's budget definition,
    ``(9 r_v + 9 r_v r_1 + 10 r_v r_1 r_2) / 28`` for LLaVA-OV-7B)."""
    k1, k2 = layers
    return (k1 * r_v + (k2 - k1) * r_v * r_1 + (depth - k2) * r_v * r_1 * r_2) / depth


def solve_ratios(
    rho: float, layers: tuple[int, int], depth: int, r_v: float, r_1: float, preset: dict
) -> tuple[float, float, float]:
    """``(r_v, r_1, r_2)`` whose :func:`layer_average` is ``rho``.

    * ``r_v`` given (the search's rule, ``llava_ov_opt_all.py``): ``r_2`` solved from the
      budget, clipped to ``[0, 1]`` (the official code clips at 1).
    * ``r_v`` 0 (ours: the official code ships configs, not a rule for other budgets):
      ``r_1`` (unless given) and ``r_2`` from ``preset``, ``r_v`` solved. A budget above what
      those allow is met by raising the later stages first (``r_v = 1``, then ``r_2``, then
      ``r_1``), so a budget of every token keeps every token.
    """
    k1, k2 = layers
    seg = (k1, k2 - k1, depth - k2)
    r_1 = r_1 or preset["r_1"]
    if r_v:
        r_2 = (rho * depth - seg[0] * r_v - seg[1] * r_v * r_1) / (seg[2] * r_v * r_1)
        return r_v, r_1, min(1.0, max(0.0, r_2))
    r_2 = preset["r_2"]
    r_v = rho / layer_average(1.0, r_1, r_2, layers, depth)
    if r_v <= 1.0:
        return r_v, r_1, r_2
    r_2 = (rho * depth - seg[0] - seg[1] * r_1) / (seg[2] * r_1)
    if r_2 <= 1.0:
        return 1.0, r_1, r_2
    return 1.0, min(1.0, (rho * depth - seg[0]) / (seg[1] + seg[2])), 1.0


def nearest_release(rho: float) -> float:
    """The released config's budget closest to ``rho`` (ties: the smaller budget)."""
    return min(sorted(RELEASED), key=lambda b: abs(b - rho))


@register
@dataclass
class VFlowOpt(Method):
    """VFlowOpt (Yang et al., ICCV 2025, arXiv 2508.05211; code sihany077/VFlowOpt).

    1. **Importance map** at vision layer ``k_v`` (``vision_layer``): with ``A`` the head-mean
       attention, global tokens are those receiving more than ``t`` times the mean received
       attention, and each patch's importance is the attention the global tokens pay it
       (:func:`~vlmprune.primitives.scoring.context_relevance`), plus ``alpha_v`` times the
       softmax over patches of each patch's pixel entropy (256-bin grey-level histogram, bits).
       With a CLS tower the CLS token takes part in the attention statistics (it can be a global
       token); only patches are scored.
    2. **Post-projector pruning with recycling** (official anyres-image path): remove the
       ``round(N (1 - r_v)) + int(N / m^2)`` least important tokens; group them by coarse cells of
       side ``m``; each group's importance-weighted mean of the *projected* features (LLM space,
       as the code) overwrites its most important member, which is restored
       (:func:`~vlmprune.primitives.merging.recycle_by_cell`; ``merged_space="projected"``). Raster order is
       kept; ``N - n_red - n_m + #groups`` tokens remain, so counts differ per image.
       ``recycle=False``: the official non-anyres path, plain top ``N - n_red``.
    3. **LLM-stage pruning** before each of the two ``llm_layers``: drop the
       ``round(M (1 - r_s))`` current tokens with the lowest importance from step 1 (no LLM
       attention); kept tokens keep their positions.

    **Budget** (the official definition): the budget is the *average* number of visual tokens
    per LLM layer, ``layer_average(r_v, r_1, r_2) * N`` (see :func:`layer_average`); more tokens
    enter the LLM than the budget (``handle.stats['points']`` reports both). Per-point budget
    schedules are refused: the counts come from the ratios. The ratios follow
    :func:`solve_ratios`; with no ratio given, ``r_1, r_2, t, m`` come from the released config
    (``preset``) nearest the budget and ``r_v`` is solved, which reproduces the released
    ``r_v`` at their budgets. ``config`` loads hyper-parameters found by
    ``python -m vlmprune.tools.calibrate_vflowopt`` (the flow-guided search). A fraction budget
    becomes ``round(N f)``; the code rounds its counts too (``round(N * (1 - r_v))`` removed).

    **Mapping to other models**: ``llm_layers`` are given for a ``llm_layers_of``-layer LLM and
    scaled, ``K -> floor(K L / 28 + 0.5)`` (9, 18 of 28 -> 10, 21 of 32 -> 1, 3 of 4);
    ``m`` is in tokens of a ``cell_reference``-wide grid (SigLIP-so400m/384: 27) and scaled
    to the model's grid width.

    **Deviations**: the importance map is carried in per-image state, not a JSON environment
    variable; batches of any size; an empty global set falls back to the most attended token
    (official: NaN); LLaVA-1.5-style single-grid
    images get recycling by default, whereas the official code recycles only on its anyres
    (multi-crop) image path; ``entropy_pixels="denormalize"`` reads de-normalised pixels where
    the official code casts normalised values to uint8 (negative values wrap; kept as default).

    **LLaVA-NeXT (anyres)**: the adapter calls the projector stage per crop (base image, each
    tile) and gives each row its place in the image (``ctx.whole_images()``). The importance map
    is computed per crop, as in the official code, and written into the image's map, numbered as
    the llm stage numbers the image's tokens (``crop * side**2 + raster``); the llm stages read it
    per image and drop ``round(M (1 - r_s))`` of the image's ``M`` current visual tokens, as in
    the official code. The ratios come from the *whole image's* budget (``r_v``, ``t``, ``m``
    identical for all its crops). Deviations from the official anyres path: (a) the official code
    ranks the image's whole sequence at once (``n_red = round(L (1 - r_v))``,
    ``n_m = int(L / m^2)`` over ``L`` = base + tiles + newlines); here each crop drops its own
    ``round(n_c (1 - r_v)) + int(n_c / cell^2)`` least important tokens, so the split over crops
    is proportional to their token counts instead of following the importance across crops, and
    the rounding is per crop; (b) recycling cells lie on the official grids (the base image's own
    grid; the joined, un-padded tile grid, via ``layout_index``), but a cell straddling a tile
    border is recycled as one group per tile (each tile is a separate call); (c) a tile's map is
    computed from the attention among its un-padded tokens (CLS included), not over the whole
    crop with its letterbox padding; (d) newline tokens: the official code gives them importance
    1, so they are never dropped (at the projector and in the LLM) and count in ``L`` and ``M``;
    here they are never candidates and never counted (``L``, ``M`` are visual tokens only), a
    newline after the projector stage is kept iff its row keeps a visual token (official: always;
    the two differ only for a tile row that loses every token), and inside the LLM newlines are
    kept like text (as the official importance 1 keeps them); (e) a crop whose share of the
    budget is 0 (budgets below the number of crops) is dropped whole by the adapter.
    """

    name = "vflowopt"
    stages = ("projector", "llm")
    needs = frozenset({"encoder_attention", "pixels", "projected"})
    paper = {
        "title": "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization",
        "arxiv": "2508.05211",
    }

    config: str = option("", "JSON file written by python -m vlmprune.tools.calibrate_vflowopt (searched r_v, r_1, t, m, alpha_v)")
    preset: str = option(
        "auto",
        "released config (LLaVA-OV-7B, average budget 50/25/10 %) supplying r_1, r_2, t, m when not given; "
        "'auto': the one nearest the budget (ours)",
        choices=("auto", "50", "25", "10"),
    )
    r_v: float = option(0.0, "post-projector keep ratio (illava_vit_r); 0: solved from the budget (ours)")
    r_1: float = option(0.0, "keep ratio at the first LLM stage; 0: from the preset (released configs)")
    t: float = option(-1.0, "global-token threshold (illava_vit_t; released 28.68/34.76/39.26); -1: from the preset")
    m: float = option(0.0, "recycling cell side (illava_vit_m; released 11.76/15.58/17.39); 0: from the preset")
    alpha_v: float = option(0.0, "entropy weight (illava_vit_alpha_v; 0 in all released configs)")
    vision_layer: int = option(-1, "ViT layer of the importance map; -1: the feature layer (official k_v=25 of LLaVA-OV's 26)")
    llm_layers: tuple = option((9, 18), "LLM pruning layers (official: before layers 9 and 18)")
    llm_layers_of: int = option(28, "depth the llm_layers refer to (Qwen2-7B: 28); 0: use them as given")
    recycle: bool = option(True, "recycle pruned tokens into cell carriers (official anyres image path); False: plain top-k")
    cell_reference: int = option(27, "grid width m refers to (SigLIP-so400m/384: 27); 0: m in this model's tokens")
    entropy_pixels: str = option(
        "code",
        "'code': uint8(x*255) of the normalised pixels, as the official code; 'denormalize': x*std+mean first",
        choices=("code", "denormalize"),
    )
    pixel_mean: tuple = option((0.5, 0.5, 0.5), "processor mean for entropy_pixels='denormalize' (SigLIP: 0.5)")
    pixel_std: tuple = option((0.5, 0.5, 0.5), "processor std for entropy_pixels='denormalize' (SigLIP: 0.5)")

    def __post_init__(self):
        super().__post_init__()
        if self.config:
            self._load_config(self.config)
        for key in ("r_v", "r_1"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"option {key!r} of method 'vflowopt' must be in [0, 1] (0: derived), got {getattr(self, key)}")
        if self.t < 0 and self.t != -1.0:
            raise ValueError(f"option 't' of method 'vflowopt' must be >= 0 (or -1: from the preset), got {self.t}")
        if self.m < 0:
            raise ValueError(f"option 'm' of method 'vflowopt' must be > 0 (or 0: from the preset), got {self.m}")
        if len(self.llm_layers) != 2:
            raise ValueError(f"option 'llm_layers' of method 'vflowopt' must list two layers, got {self.llm_layers!r}")
        if not self.alpha_v:  # what this instance reads: pixels only for the entropy term
            self.needs = type(self).needs - {"pixels"}

    def _load_config(self, path: str) -> None:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as err:
            raise ValueError(f"option 'config' of method 'vflowopt': cannot read {path!r} ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
            raise ValueError(f"option 'config' of method 'vflowopt': {path!r} must hold a JSON object with an 'options' object")
        unknown = sorted(set(data) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"config {path!r}: unknown top-level keys {unknown}; valid: {list(_CONFIG_KEYS)}")
        if data.get("method", self.name) != self.name:
            raise ValueError(f"config {path!r} is for method {data['method']!r}, not 'vflowopt'")
        fields = {f.name: f for f in dataclasses.fields(self) if f.name not in ("config", "seed")}
        unknown = sorted(set(data["options"]) - set(fields))
        if unknown:
            raise ValueError(f"config {path!r}: unknown option(s) {unknown}; valid: {sorted(fields)}")
        for key, value in data["options"].items():
            f = fields[key]
            if getattr(self, key) != f.default:
                raise ValueError(f"option {key!r} of method 'vflowopt' is given both as a keyword and in config {path!r}")
            _check_option(self.name, f, value)
            setattr(self, key, tuple(value) if isinstance(f.default, tuple) else value)

    # -- where it acts -------------------------------------------------------------------------------
    def layers(self, info) -> tuple[int, int]:
        return scale_llm_layers(self.llm_layers, self.llm_layers_of, info.llm_layers, "option 'llm_layers' of method 'vflowopt'")

    def vision_layer_of(self, info) -> int:
        layer = info.feature_layer if self.vision_layer == -1 else self.vision_layer
        if not 0 <= layer < info.encoder_layers:
            raise ValueError(
                f"option 'vision_layer' of method 'vflowopt' must be -1 or in [0, {info.encoder_layers - 1}], got {self.vision_layer}"
            )
        return layer

    def points(self, info):
        self.vision_layer_of(info)
        return [Point("projector")] + [Point("llm", k) for k in self.layers(info)]

    def capture_layers(self, info):
        return {"encoder": (self.vision_layer_of(info),), "llm": ()}  # the LLM stages read no LLM attention

    def hyper(self, rho: float, info) -> dict:
        """The resolved ``r_v, r_1, r_2, t, m`` for an average keep fraction ``rho``."""
        preset = RELEASED[nearest_release(rho) if self.preset == "auto" else int(self.preset) / 100]
        r_v, r_1, r_2 = solve_ratios(rho, self.layers(info), info.llm_layers, self.r_v, self.r_1, preset)
        return dict(r_v=r_v, r_1=r_1, r_2=r_2, t=preset["t"] if self.t == -1.0 else self.t, m=self.m or preset["m"])

    # -- selection ---------------------------------------------------------------------------------------
    def select(self, ctx: TokenContext) -> Selection:
        if ctx.budget != ctx.target:
            raise ValueError(
                "method 'vflowopt' derives the count at every point from r_v, r_1, r_2 and the budget (the average "
                "visual tokens per LLM layer); give an int or a fraction, not a per-point schedule"
            )
        if ctx.stage == "projector":
            return self._prune_projector(ctx)
        return self._prune_llm(ctx)

    def importance(self, ctx: TokenContext, t) -> torch.Tensor:
        """Step 1: the importance ``[B, N]`` of the current tokens (``t``: a float, or a ``[B, 1]``
        tensor with one threshold per row)."""
        probs = ctx.signals.encoder_attention(layer=self.vision_layer_of(ctx.info))
        imp = context_relevance(probs, t)
        if ctx.info.has_cls:
            imp = imp[:, 1:]
        if self.alpha_v:
            imp = imp + self.alpha_v * self.pixel_entropy(ctx.signals.pixels()).softmax(dim=-1)
        return imp

    def pixel_entropy(self, patches: torch.Tensor) -> torch.Tensor:
        """Grey-level entropy (bits) of each pixel patch ``[B, N, C, p, p] -> [B, N]``: grey =
        ``round(0.3333 * sum_c v_c)`` of 8-bit values ``v`` (official weights), in the official
        code's arithmetic: ``x * 255`` in the pixels' own dtype (the tensor fed to the tower:
        float32 in a float32 run, float16 in the paper's evaluation) before the uint8 cast, the
        weighted sum in float32. (In float64 some levels differ: ``float32(257/255) * 255`` is 257
        in float32 and 256.99... in float64.)"""
        x = patches if patches.is_floating_point() else patches.float()
        if self.entropy_pixels == "denormalize":
            mean = torch.tensor(self.pixel_mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.tensor(self.pixel_std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            x = (x * std + mean).clamp(0, 1)
        levels = torch.remainder((x * 255).trunc(), 256).float()  # float -> uint8: truncate, wrap negatives
        weight = torch.tensor(0.3333, dtype=torch.float32, device=x.device)
        grey = (levels * weight).sum(dim=2).round().long()
        return histogram_entropy(grey.flatten(2))

    def _prune_projector(self, ctx: TokenContext) -> Selection:
        """Step 1 and 2 on the rows of this call. A row is a whole image or, where the adapter
        calls this stage per part of an image (LLaVA-NeXT: per crop, ``ctx.parts``), one part:
        the ratios then come from the whole image's budget, the row's importance is written into
        the whole image's map (numbered as the llm stage numbers the image's tokens) and the
        recycling cells lie on the model's layout of the part's region (``layout_index``)."""
        n = ctx.n
        whole = ctx.whole_images()
        hps = [self.hyper(w.target / w.n, ctx.info) for w in whole]
        ts = [hp["t"] for hp in hps]
        imp = self.importance(ctx, ts[0] if len(set(ts)) == 1 else torch.tensor(ts, device=ctx.tokens.device).view(-1, 1))
        for j, (w, hp) in enumerate(zip(whole, hps)):
            entry = w.state.get(self.name)
            if entry is None:  # the first part of this image in this forward (or the whole image)
                entry = w.state[self.name] = {
                    "importance": imp.new_zeros(w.grid[0] * w.grid[1]),
                    "ratios": (hp["r_1"], hp["r_2"]),
                    "layers": self.layers(ctx.info),
                }
            entry["importance"][w.index.to(imp.device)] = imp[j]
        n_red = [min(n - 1, round(n * (1 - hp["r_v"]))) for hp in hps]
        if not self.recycle:
            if len(set(n_red)) == 1:
                return Selection(keep=topk_keep_order(imp, n - n_red[0]), scores=imp)
            return Selection(keep=[topk_keep_order(imp[j : j + 1], n - r)[0] for j, r in enumerate(n_red)], scores=imp)
        order = torch.sort(imp, dim=-1, stable=True).indices
        projected = ctx.signals.projected()  # the code recycles projected features (LLM space)
        keeps, values, owners = [], [], []
        for j, (w, hp) in enumerate(zip(whole, hps)):
            width = w.grid[1]  # the model's grid width (a crop's side on LLaVA-NeXT)
            cell = hp["m"] * width / self.cell_reference if self.cell_reference else hp["m"]
            n_low = min(n, n_red[j] + int(n / cell**2))
            pruned = torch.zeros(n, dtype=torch.bool, device=imp.device)
            pruned[order[j, :n_low]] = True
            raster, cols = (w.layout_index, w.layout_grid[1]) if w.layout_index is not None else (ctx.token_index[j], ctx.grid[1])
            keep, vals, owner = recycle_by_cell(projected[j], imp[j], pruned, raster.to(imp.device), cols, cell)
            keeps.append(keep)
            values.append(vals)
            owners.append(owner)
        return Selection(keep=keeps, merged=values, scores=imp, merge_map=torch.stack(owners), merged_space="projected")

    def _prune_llm(self, ctx: TokenContext) -> Selection:
        states = [s[self.name] for s in ctx.image_state]
        ratio = states[0]["ratios"][states[0]["layers"].index(ctx.layer)]
        imp = torch.stack([s["importance"][ctx.token_index[j]] for j, s in enumerate(states)])
        count = ctx.n - round(ctx.n * (1 - ratio))
        if count == 0:
            return Selection(keep=torch.empty(ctx.tokens.shape[0], 0, dtype=torch.long, device=imp.device), scores=imp)
        return Selection(keep=topk_keep_order(imp, count), scores=imp)
