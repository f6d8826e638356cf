"""The conformance kit's VLA case (adapters/vla.py): :class:`VLACase`, an OpenVLA-style
:class:`vlmprune.vla.VLAPolicy` around the tiny CLIP LLaVA, hooked into tests/cases.py ``CASES``."""

from __future__ import annotations

import torch

from tests.cases import LlavaCase
from tests.tiny import tiny_llava
from tests.truth import positions_from_mask
from vlmprune.vla import VLAPolicy

#: action ids of the tiny policy: the last 16 of the 96-id vocabulary, 3 per control step
BINS, ACTION_DIM = 16, 3


def tiny_policy(attn: str = "sdpa", seed: int = 0) -> VLAPolicy:
    return VLAPolicy(tiny_llava("clip", attn, seed=seed), action_dim=ACTION_DIM, bins=BINS)


def action_ids_no_cache(policy: VLAPolicy, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding among the action ids that re-runs the whole prompt at every step (no cache)."""
    ids = policy.action_ids.sort().values
    seq, new = dict(inputs), []
    for _ in range(steps):
        with torch.no_grad():
            last = policy.llava(**seq, position_ids=positions_from_mask(seq["attention_mask"]), use_cache=False).logits[:, -1]
        nxt = ids[last[:, ids].argmax(-1)][:, None]
        new.append(nxt)
        seq["input_ids"] = torch.cat([seq["input_ids"], nxt], 1)
        seq["attention_mask"] = torch.cat([seq["attention_mask"], torch.ones_like(nxt)], 1)
    return torch.cat(new, 1)


class VLACase(LlavaCase):
    """:func:`tiny_policy` (256 patches, 4 LLM layers, 3 action ids of 16 bins per step). The
    oracles read the LLaVA's logits (``policy.llava``, wrapped through the policy) and the decoded
    action ids (``policy.action_tokens``); the manual reference is the LLaVA case's. Every wrap is
    one episode whose steps are the oracle's forwards."""

    family = "vla"
    #: the methods the VLA benchmark compares (issue 16): VLA-Pruner, FastV, DivPrune, uniform, random; and fixed
    served = frozenset({"vla_pruner", "fastv", "divprune", "uniform", "random", "fixed"})

    def __init__(self):
        super().__init__("clip", "sdpa")
        self.id = "vla"
        self.variant = False

    def build(self):
        return tiny_policy()

    def forward(self, model, inputs):
        return super().forward(model.llava, inputs)

    def generate(self, model, inputs, steps=None):
        return model.action_tokens(**inputs, steps=steps or self.steps)

    def no_cache(self, model, inputs, steps):
        return action_ids_no_cache(model, inputs, steps)

    def assert_unpatched(self, model):
        assert not hasattr(model, "_vlmprune_handle") and "forward" not in vars(model)
        super().assert_unpatched(model.llava)

    def restriction(self, row, oracle):
        from tests.cases import EXPECT

        if EXPECT[row].method not in self.served:
            return "the VLA case runs the methods its benchmark compares (VLA-Pruner, FastV, DivPrune, uniform, random) and fixed"
        return super().restriction(row, oracle)

    def manual(self, model, inputs, handle, seen, pruned):
        super().manual(model.llava, inputs, handle, seen, pruned)
