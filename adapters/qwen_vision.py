"""Encoder-stage mechanics for Qwen2-VL / Qwen2.5-VL's vision encoder (``model.model.visual``).

The encoder packs the patches of every image (and frame) of a forward into one sequence.
Patches arrive grouped: the ``m x m`` patches (``m = spatial_merge_size``) that the merger
fuses into one LLM token are consecutive, and the groups follow the raster order of the
merged grid, frame after frame, image after image (``get_vision_position_ids`` lays the
rotary positions out the same way). Qwen2-VL attends within each frame (``cu_seqlens``);
Qwen2.5-VL first permutes the groups into window order (``window_index``) and attends within
each window (``cu_window_seqlens``) except in ``fullatt_block_indexes``, where it attends
within each frame; after the merger it undoes the permutation (``argsort(window_index)``).

Pruning removes whole groups. :class:`PackedGroups` tracks, for each group still alive, its
image, frame, window and raster index in the packed (possibly window-permuted) order.
Pre-hooks on every block from the first pruning layer on replace what the tower's loop
passes: the shortened hidden states, ``cu_seqlens`` rebuilt from the kept groups (the frame
layout, or, for window blocks, the window layout: a kept group stays in its window, emptied
windows disappear), the rotary ``(cos, sin)`` gathered for the kept patches and
``max_seqlen`` (flash attention only). Kept groups keep their packed order, so frames and
windows stay contiguous. A forward hook on the merger scatters its rows back to the full
group count (zeros for dropped groups), so the tower's own final reordering stays valid; the
adapter then reads the kept groups by raster index. Everything else is transformers' code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Installed, read_arg, write_arg


class QwenTower:
    """Anatomy of the Qwen2-VL / 2.5-VL vision encoder."""

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.merge = int(visual.spatial_merge_size)
        self.unit = self.merge**2
        config = visual.config
        self.windowed = getattr(config, "fullatt_block_indexes", None) is not None and hasattr(config, "window_size")
        self.full_blocks = set(config.fullatt_block_indexes) if self.windowed else set(range(len(self.blocks)))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def window_index(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(window_index, cu_window_seqlens)`` exactly as the tower computes them."""
        visual = self.visual
        fn = getattr(sys.modules.get(type(visual).__module__), "get_vision_window_index", None)
        if fn is not None:
            index, cu = fn(grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size)
        elif hasattr(visual, "get_window_index"):  # older transformers: a method of the tower
            index, cu = visual.get_window_index(grid_thw)
        else:
            raise RuntimeError(
                f"vlmprune: cannot find how {type(visual).__name__} orders its windows (get_vision_window_index); "
                "encoder-stage pruning does not support this transformers version"
            )
        cu = torch.as_tensor(cu, device=grid_thw.device, dtype=torch.int32)
        return index.to(grid_thw.device), torch.unique_consecutive(cu)


class PackedGroups:
    """The merge groups of one tower forward, in packed order, and which of them are alive.

    ``order[p]``: the global raster group id at packed position ``p`` (raster ids number each
    image's groups ``t * h * w / m^2`` in raster order of its merged grid, image after image);
    ``image``, ``raster`` (local to the image), ``frame`` and ``window`` per packed position.
    ``alive``: packed positions still alive, ascending.
    """

    def __init__(self, tower: QwenTower, grid_thw: torch.Tensor):
        device = grid_thw.device
        self.tower = tower
        unit = tower.unit
        thw = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        self.counts = [t * h * w // unit for t, h, w in thw]  # groups per image
        self.offsets = [sum(self.counts[:i]) for i in range(len(thw))]
        image = torch.repeat_interleave(torch.arange(len(thw), device=device), torch.tensor(self.counts, device=device))
        raster = torch.cat([torch.arange(c, device=device) for c in self.counts])
        per_frame = torch.tensor([h * w // unit for _, h, w in thw], device=device)
        frame_base = torch.tensor([0] + [t for t, _, _ in thw], device=device).cumsum(0)[:-1]
        frame = frame_base[image] + raster // per_frame[image]
        total = sum(self.counts)
        if tower.windowed:
            order, cu_windows = tower.window_index(grid_thw)
            if order.numel() != total or int(cu_windows[-1]) != total * unit:
                raise RuntimeError("vlmprune: the tower's window index does not cover every merge group")
            bounds = cu_windows[1:].long() // unit
            window = torch.searchsorted(bounds, torch.arange(total, device=device), right=True)
            self.cu_windows = cu_windows
        else:
            order = torch.arange(total, device=device)
            window = None
            self.cu_windows = None
        self.order = order.long()
        self.image = image[self.order]
        self.raster = raster[self.order]
        self.frame = frame[self.order]
        self.window = window
        self.alive = torch.arange(total, device=device)
        self.cu_frames = self.cu_seqlens("frame")
        self.full_cu = {"frame": self.cu_frames, "window": self.cu_windows}
        self.pruned = False

    @property
    def total(self) -> int:
        return self.order.numel()

    def cu_seqlens(self, layout: str) -> torch.Tensor:
        """Cumulative patch counts of the alive groups' frames or windows (empty ones dropped)."""
        ids = (self.frame if layout == "frame" else self.window)[self.alive]
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        return F.pad((counts * self.tower.unit).cumsum(0), (1, 0)).to(torch.int32)

    def patch_rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Patch rows of the given group positions (``m^2`` consecutive rows each)."""
        unit = self.tower.unit
        return (groups[:, None] * unit + torch.arange(unit, device=groups.device)).flatten()

    def members(self, image: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions into alive, raster ids)`` of one image's alive groups, in raster order."""
        pos = (self.image[self.alive] == image).nonzero().flatten()
        raster = self.raster[self.alive[pos]]
        order = torch.argsort(raster)
        return pos[order], raster[order]

    def kept_rasters(self, image: int) -> torch.Tensor:
        return self.members(image)[1]


def install_qwen_encoder(
    installed: Installed,
    tower: QwenTower,
    layers: list[int],
    state: Callable[[], PackedGroups | None],
    prune: Callable[[int, torch.Tensor, PackedGroups], torch.Tensor],
) -> None:
    """Pre-hooks on blocks ``min(layers)`` .. last and a forward hook on the merger. They act
    only while ``state()`` returns a :class:`PackedGroups` (the adapter's image forward); video
    and other calls of the tower pass through untouched. ``prune(layer, hidden, packed)`` runs
    before each block in ``layers``: it updates ``packed.alive`` and returns the kept rows.
    Layer ``depth`` (after the last block) prunes the merger's input: a pre-hook on the merger."""
    first = min(layers)
    prune_at = set(layers)

    def pre_hook(module, args, kwargs, index):
        packed = state()
        if packed is None:
            return None
        layout = "frame" if index in tower.full_blocks else "window"
        cu = read_arg(args, kwargs, "cu_seqlens", 1)
        rope = read_arg(args, kwargs, "position_embeddings", None, aliases=("rotary_pos_emb",))
        # the tower passes its full-length layout to every block: check it is what we rebuild from
        expected = packed.full_cu[layout]
        if cu is None or expected is None or not torch.equal(cu.to(expected), expected):
            raise RuntimeError(
                f"vlmprune: Qwen vision block {index} did not receive the expected {layout} cu_seqlens; "
                "this transformers version lays the vision encoder out differently, so encoder-stage pruning "
                "is not supported with it"
            )
        if not isinstance(rope, (tuple, list)) or rope[0].shape[0] != packed.total * tower.unit:
            raise RuntimeError(
                f"vlmprune: Qwen vision block {index} did not receive per-patch (cos, sin) position_embeddings; "
                "encoder-stage pruning is not supported with this transformers version"
            )
        hidden = read_arg(args, kwargs, "hidden_states", 0)
        if index in prune_at:
            hidden = prune(index, hidden, packed)
            packed.pruned = True
        if not packed.pruned:
            return None
        new_cu = packed.cu_seqlens(layout).to(device=cu.device, dtype=cu.dtype)
        rows = packed.patch_rows(packed.alive).to(rope[0].device)
        args, kwargs = write_arg(args, kwargs, "hidden_states", hidden, 0)
        args, kwargs = write_arg(args, kwargs, "cu_seqlens", new_cu, 1)
        args, kwargs = write_arg(args, kwargs, "position_embeddings", tuple(x[rows] for x in rope), None, aliases=("rotary_pos_emb",))
        if read_arg(args, kwargs, "max_seqlen") is not None:  # flash attention reads it
            args, kwargs = write_arg(args, kwargs, "max_seqlen", int((new_cu[1:] - new_cu[:-1]).max()))
        return args, kwargs

    for index in range(first, tower.depth):
        installed.hook(
            tower.blocks[index].register_forward_pre_hook(
                lambda m, a, k, index=index: pre_hook(m, a, k, index), with_kwargs=True
            )
        )

    def merger_pre_hook(module, args, kwargs):
        packed = state()
        if packed is None:
            return None
        hidden = prune(tower.depth, read_arg(args, kwargs, "hidden_states", 0, aliases=("x",)), packed)
        packed.pruned = True
        return write_arg(args, kwargs, "hidden_states", hidden, 0, aliases=("x",))

    if tower.depth in prune_at:
        installed.hook(tower.merger.register_forward_pre_hook(merger_pre_hook, with_kwargs=True))

    def merger_hook(module, args, output):
        packed = state()
        if packed is None or not packed.pruned:
            return None
        full = output.new_zeros(packed.total, output.shape[-1])
        full[packed.alive.to(output.device)] = output
        return full

    installed.hook(tower.merger.register_forward_hook(merger_hook))



# -- vision-encoder attention, recomputed from a block's q and k ----------------------------------
class AttentionCapture:
    """Per-forward store of the captured vision blocks: ``{block: {"q", "k", "v", "cu", "alive"}}``
    with ``q``, ``k`` ``[S, H, D]`` after the block's own rotary embedding (``v`` as projected), ``cu`` the
    ``cu_seqlens`` the block attended with (frames, or 2.5-VL windows) and ``alive`` the packed
    positions of the groups alive at that block (all of them unless encoder pruning ran)."""

    def __init__(self):
        self.blocks: dict[int, dict[str, torch.Tensor]] = {}
        self.merger_input: torch.Tensor | None = None  # [S, C_v] alive patches, packed order

    def clear(self) -> None:
        self.blocks.clear()
        self.merger_input = None


def _rotary_of(attn: nn.Module) -> Callable:
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb_vision", None)
    if fn is None:
        raise RuntimeError(
            f"vlmprune: cannot find the rotary embedding of {type(attn).__name__} (apply_rotary_pos_emb_vision); "
            "encoder attention signals are not supported with this transformers version"
        )
    return fn


def install_qwen_capture(
    installed: Installed,
    tower: QwenTower,
    blocks: tuple[int, ...],
    state: Callable[[], PackedGroups | None],
    store: Callable[[], AttentionCapture],
) -> None:
    """Keep, for each vision block in ``blocks`` (0-based), its queries and keys after the rotary
    embedding, the ``cu_seqlens`` it used and the groups alive there. A pre-hook on the block's
    attention module reads ``cu_seqlens`` and ``(cos, sin)`` as the block passes them (after the
    encoder-pruning pre-hooks, so they describe the sequence actually attended); a forward hook
    on its ``qkv`` projection splits q/k exactly as the model does and applies the model's own
    ``apply_rotary_pos_emb_vision``. Active only while ``state()`` is set (the adapter's image
    forward); the attention itself runs untouched (SDPA, flash or eager)."""
    for index in blocks:
        if not 0 <= index < tower.depth:
            raise ValueError(f"vision block {index} to capture is outside the tower's 0..{tower.depth - 1}")
        attn = tower.blocks[index].attn
        rotary = _rotary_of(attn)
        pending: dict[str, object] = {}

        def pre_hook(module, args, kwargs, index=index, pending=pending):
            pending.clear()
            packed = state()
            if packed is None:
                return
            cu = read_arg(args, kwargs, "cu_seqlens", 1)
            rope = read_arg(args, kwargs, "position_embeddings", None)
            if cu is None or not isinstance(rope, (tuple, list)):
                raise RuntimeError(
                    f"vlmprune: Qwen vision block {index} was not called with cu_seqlens and (cos, sin) "
                    "position_embeddings; encoder attention signals are not supported with this transformers version"
                )
            pending.update(cu=cu, rope=rope, alive=packed.alive.clone())
            return

        def qkv_hook(module, args, output, index=index, pending=pending, attn=attn, rotary=rotary):
            if not pending:
                return
            cos, sin = pending["rope"]
            heads = attn.num_heads
            q, k, v = output.reshape(-1, 3, heads, output.shape[-1] // (3 * heads)).permute(1, 0, 2, 3).unbind(0)
            q, k = rotary(q, k, cos, sin)
            store().blocks[index] = {
                "q": q.detach(), "k": k.detach(), "v": v.detach(), "cu": pending["cu"], "alive": pending["alive"]
            }
            pending.clear()
            return

        installed.hook(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
        installed.hook(attn.qkv.register_forward_hook(qkv_hook))


def group_attention(
    tower: QwenTower, packed: PackedGroups, captured: dict[str, torch.Tensor], image: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities ``[H, G, G]`` of one captured block among one image's groups
    alive there, in raster order, and their raster ids ``[G]``.

    Patch level: ``softmax(q k^T * d^-1/2)`` (float32) with every query attending only to keys
    of its own ``cu_seqlens`` segment (the frame, or the 2.5-VL window, exactly as the block
    did). Group level (one row/column per merged token): the rows of a group's ``m^2`` patches
    are averaged and the columns summed over each key group, so each row is still a probability
    distribution over the merged tokens. ``received_attention`` of the result (mean over rows)
    is the official Qwen2.5-VL HiPrune reduction (sum over queries, mean over a group's patches)
    divided by the number of groups: the same ranking."""
    unit = tower.unit
    alive = captured["alive"].to(packed.image.device)
    mine = (packed.image[alive] == image).nonzero().flatten()  # positions in the captured sequence
    raster = packed.raster[alive[mine]]
    q, k = captured["q"], captured["k"]
    rows = packed.patch_rows(mine.to(q.device))  # packed order: segments stay contiguous
    cu = captured["cu"].to(q.device).long()
    segment = torch.searchsorted(cu[1:], rows, right=True)
    apart = segment[:, None] != segment[None, :]
    g = rows.numel() // unit
    grouped = []
    for head in range(q.shape[1]):  # one [P, P] matrix at a time: memory P^2, not H P^2
        qi, ki = q[rows, head].float(), k[rows, head].float()
        probs = ((qi @ ki.T) * qi.shape[-1] ** -0.5).masked_fill_(apart, float("-inf")).softmax(-1)
        grouped.append(probs.view(g, unit, g, unit).mean(1).sum(-1))
    grouped = torch.stack(grouped)  # [H, G, G]
    order = torch.argsort(raster.to(q.device))
    return grouped[:, order][:, :, order], raster.to(q.device)[order]


def group_qkv(
    tower: QwenTower, packed: PackedGroups, captured: dict[str, torch.Tensor], image: int
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``((q, k, v), raster)``: one captured block's per-head queries and keys (after its rotary
    embedding) and values ``[H, G * m^2, D]`` for one image's groups alive there, the groups in
    raster order with each group's ``m^2`` patches on consecutive rows (in the merger's order),
    and the groups' raster ids ``[G]``."""
    alive = captured["alive"].to(packed.image.device)
    mine = (packed.image[alive] == image).nonzero().flatten()
    raster = packed.raster[alive[mine]]
    order = torch.argsort(raster)
    rows = packed.patch_rows(mine[order].to(captured["q"].device))
    qkv = tuple(captured[key][rows].transpose(0, 1) for key in ("q", "k", "v"))
    return qkv, raster[order].to(captured["q"].device)


def install_merger_input(
    installed: Installed, tower: QwenTower, state: Callable[[], PackedGroups | None], store: Callable[[], AttentionCapture]
) -> None:
    """Keep the merger's input (the last block's output for the alive groups, packed order) in
    ``store().merger_input`` during the adapter's image forward. Registered after any pruning
    pre-hook on the merger, so it sees the groups that are actually merged."""

    def pre_hook(module, args, kwargs):
        if state() is not None:
            store().merger_input = read_arg(args, kwargs, "hidden_states", 0, aliases=("x",)).detach()

    installed.hook(tower.merger.register_forward_pre_hook(pre_hook, with_kwargs=True))


class GroupProjector(nn.Module):
    """The merger as a row-wise map (signal ``projector``): ``[R, m^2 C_v]`` (a merge group's
    patches concatenated, signal ``projector_input``) to ``[R, C_llm]``, through the merger's own
    per-patch norm and MLP. Its parameters are the merger's (``merger.*``), so
    ``torch.func.functional_call`` can run it in another dtype."""

    def __init__(self, tower: QwenTower):
        super().__init__()
        self.merger = tower.merger
        self.unit = tower.unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merger(x.reshape(-1, x.shape[-1] // self.unit))
