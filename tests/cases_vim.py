"""The conformance kit's vision-Mamba case (adapters/mamba.py): :class:`VimCase`, hooked into
tests/cases.py ``CASES``; and :func:`run_by_hand`, the block loop on hand-gathered tokens that the
manual oracle and tests/test_vim.py compare against."""

from __future__ import annotations

import torch

from tests.cases import PixelCase


def tiny_vim(cls_position=None, depth: int = 4, seed: int = 0):
    """A random :class:`VimClassifier`: 16 x 16 images of 4 x 4 patches of 4 px (16 patches), width
    16, ``depth`` blocks, 5 classes; class token in the middle (index 8) unless ``cls_position``."""
    from vlmprune.embedded.vim_model import VimClassifier, VimConfig

    torch.manual_seed(seed)
    config = VimConfig(image_size=16, patch_size=4, d_model=16, depth=depth, d_state=4, num_classes=5, cls_position=cls_position)
    return VimClassifier(config).eval()


def sequence_and_logits(model, pixels: torch.Tensor) -> torch.Tensor:
    """One forward: ``[B, classes + (tokens after the final norm) * D]``, logits then the final
    sequence flattened (read by a forward hook on ``norm_f``, removed before returning)."""
    seen = []
    handle = model.norm_f.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = model(pixels)
    finally:
        handle.remove()
    return torch.cat([logits, seen[0].flatten(1)], dim=1)


def run_by_hand(model, pixels: torch.Tensor, prunes: dict[int, list[tuple]], place: str) -> torch.Tensor:
    """:func:`sequence_and_logits` rebuilt with the model's own modules, one image at a time:
    embedding, then each block, with the tokens pruned before block ``l`` (``l = depth``: before
    the final norm) per ``prunes[l][i] = (keep, merged)`` (patch indices of the current sequence,
    replacement values or None): the kept patches in order and the class token between the same
    patches (``place="stay"``) or after ``k // 2`` of them (``"middle"``)."""
    rows = []
    depth = len(model.backbone.layers)
    with torch.no_grad():
        for i in range(pixels.shape[0]):
            x = model.embed(pixels[i : i + 1])[0]
            c = model.cls_index
            for layer in range(depth + 1):
                if layer in prunes:
                    keep, merged = prunes[layer][i]
                    patches = torch.cat([x[:c], x[c + 1 :]])
                    kept = patches[keep] if merged is None else merged
                    new_c = int((keep < c).sum()) if place == "stay" else kept.shape[0] // 2
                    x = torch.cat([kept[:new_c], x[c : c + 1], kept[new_c:]])
                    c = new_c
                if layer < depth:
                    x = model.backbone.layers[layer](x[None])[0]
            final = model.norm_f(x[None])
            logits = model.head(final[:, c])
            rows.append(torch.cat([logits, final.flatten(1)], dim=1))
    return torch.cat(rows)


class VimCase(PixelCase):
    """:class:`vlmprune.embedded.vim_model.VimClassifier` (:func:`tiny_vim`, 4 blocks, class token
    in the middle of 16 patches). The oracles read the logits and the final token sequence
    (:func:`sequence_and_logits`); boundary methods act at ``mixer:2`` (the adapter's default,
    depth // 2), ToP-ViM at 1, 2, 3 (5, 10, 15 of 24 scaled), ToMe (r=2) at 1..4. No text,
    no generate()."""

    id = family = "vim"
    N = 16
    full_budget = N
    full_counts = [N, N]
    budget = unwrap_budget = 6
    has_generate = False
    #: the methods that act on a Vim: boundary methods reading the tokens only, ToP-ViM, and ToMe
    #: (merging between blocks on the hidden states, in place)
    served = frozenset({"uniform", "random", "divprune", "top_vim", "tome"})

    def build(self):
        return tiny_vim()

    def inputs(self, n, seed):
        return {"pixel_values": torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}

    def single(self, inputs, i, seed):
        return {"pixel_values": inputs["pixel_values"][i : i + 1]}

    def forward(self, model, inputs):
        return sequence_and_logits(model, inputs["pixel_values"])

    def visual_counts(self, handle):
        """Patches per image after the last point (no point ran, ToMe with r=0: every patch)."""
        points = handle.stats["points"]
        return list(points[-1]["out"]) if points else self.full_counts

    def assert_unpatched(self, model):
        assert not hasattr(model, "_vlmprune_handle")
        assert all("ssm" not in vars(layer.mixer) for layer in model.backbone.layers)

    def restriction(self, row, oracle):
        from tests.cases import EXPECT

        if oracle == "cache":
            return "a Vim classifier has no generate() and no cache"
        if EXPECT[row].method not in self.served:
            return (
                "acts on a Vim only through signals it lacks (attention, a projector, text, an LLM) or at stages it "
                "does not have (fixed names VLM stages); the Vim serves uniform, random, DivPrune, ToP-ViM and ToMe"
            )
        return super().restriction(row, oracle)

    def manual(self, model, inputs, handle, seen, pruned):
        """:func:`run_by_hand` with the recorded selections, the class token placed as the wrap's
        method asks (ToP-ViM: the middle; the others: where it was); ToMe's merged values in its kept
        slots."""
        prunes = {rec[0].layer: rec[2].per_image() for rec in seen}
        prunes = {layer: [(keep, merged) for keep, merged, _ in rows] for layer, rows in prunes.items()}
        place = getattr(handle.method, "cls_place", "stay")
        torch.testing.assert_close(pruned, run_by_hand(model, inputs["pixel_values"], prunes, place), atol=1e-5, rtol=1e-5)
