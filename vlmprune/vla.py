"""An OpenVLA-style policy on transformers' ``LlavaForConditionalGeneration`` (issue 16).

OpenVLA (Kim et al., arXiv 2406.09246) is a LLaVA-shaped model (vision tower -> projector ->
Llama) whose actions are vocabulary ids: every action dimension is cut into the same ``bins``
bins and bin ``b`` (0 = the lowest value) is written as the id ``vocab - 1 - b``, i.e. the last
``bins`` ids of the vocabulary, the lowest bin last. One control step decodes ``action_dim`` ids
greedily, one per dimension, and maps each back to its bin's value.

:class:`VLAPolicy` is that convention around any LLaVA model; ``vlmprune.wrap(policy, method,
budget)`` serves it with the VLA adapter (``vlmprune.adapters.vla``), whose session is the
episode: ``ctx.step`` counts control steps, ``ctx.state.session`` keeps the episode's memory
(VLA-Pruner's history of the action tokens' attention) and ``handle.reset()`` starts the next
episode::

    policy = VLAPolicy(llava, action_dim=7, bins=256)
    handle = vlmprune.wrap(policy, "vla_pruner", budget=0.25)
    for frame in episode:                      # one control step per frame
        action = policy.predict_action(**processor(images=frame, text=prompt, return_tensors="pt"))
    handle.reset()                             # the next episode

Departures from OpenVLA's ``predict_action`` (``prismatic/extern/hf/modeling_prismatic.py``):
decoding is restricted to the action ids (OpenVLA decodes over the whole vocabulary and clips
the id into the bins; a trained OpenVLA emits action ids anyway), and ``bins`` ids map onto
``bins`` centres over ``[-1, 1]`` (OpenVLA's 256 ids map onto the 255 centres ``c`` of
``np.linspace(-1, 1, 256)``, its two highest-valued ids onto the top one:
``values=torch.cat([c, c[-1:]])`` reproduces it). ``low``/``high`` un-normalise as OpenVLA's
``q01``/``q99`` statistics do. OpenVLA appends the id 29871 (an empty Llama token)
to every prompt; do that in the prompt you build.

Wrapping a real OpenVLA checkpoint: ``openvla/openvla-7b`` loads only with ``trust_remote_code``
(its Prismatic classes, which cannot be installed here), so it is converted first. Its language
model is a stock ``LlamaForCausalLM`` and its projector an MLP: both go into a
``LlavaForConditionalGeneration`` (256 image placeholders after BOS), and then
``VLAPolicy(converted, action_dim=7, bins=256, vocab_size=32000, low=q01, high=q99)`` with the
``values`` above and the dataset's ``norm_stats``. The vision side is the gap: Prismatic fuses two
timm ViTs (DINOv2 and SigLIP, patch features concatenated), which no LLaVA tower and no row of the
adapters' anatomy table (``adapters/vision.py``) describes; a converted model needs a tower module
the table can read (its own row), which this library does not ship. The LLM stage, where
VLA-Pruner and FastV act, and the decode capture touch only the Llama.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList


class _ActionIdsOnly(LogitsProcessor):
    """Greedy decoding among the action ids only (every other id gets ``-inf``)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        allowed = torch.full_like(scores, float("-inf"))
        allowed[:, self.ids.to(scores.device)] = 0
        return scores + allowed


class VLAPolicy(nn.Module):
    """An OpenVLA-style policy: ``llava`` (a ``LlavaForConditionalGeneration``) decoding
    ``action_dim`` action ids per control step among the last ``bins`` ids of its vocabulary.

    ``values``: the value of each bin, lowest first (default: the ``bins`` bin centres over
    ``[-1, 1]``, ``-1 + (2b + 1) / bins``); ``low``/``high`` (``[action_dim]``, optional):
    un-normalise ``x`` to ``low + (x + 1) / 2 * (high - low)`` (OpenVLA's q01/q99).
    ``vocab_size``: where the action ids end (default: the language model's vocabulary size;
    OpenVLA: its tokenizer's 32000, below the padded embedding table).

    ``policy(pixel_values=..., input_ids=..., attention_mask=...)`` (also
    :meth:`predict_action`) returns the actions ``[B, action_dim]``; :meth:`action_tokens` the
    decoded ids. Prompts of a batch are left-padded, as ``generate()`` wants them.
    """

    def __init__(self, llava: nn.Module, action_dim: int = 7, bins: int = 256, values=None, low=None, high=None,
                 vocab_size: int | None = None):
        super().__init__()
        if not hasattr(llava, "generate") or getattr(getattr(llava, "config", None), "model_type", None) != "llava":
            raise TypeError(f"VLAPolicy wraps a LlavaForConditionalGeneration, got {type(llava).__name__}")
        vocab = vocab_size or llava.config.text_config.vocab_size
        for name, value, top in (("action_dim", action_dim, None), ("bins", bins, vocab)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (top is not None and value > top):
                raise ValueError(f"parameter {name!r} must be an int in [1, {top or 'inf'}], got {value!r}")
        self.llava = llava
        self.action_dim = action_dim
        self.bins = bins
        self.vocab_size = vocab
        centres = -1 + (2 * torch.arange(bins, dtype=torch.float32) + 1) / bins
        values = centres if values is None else torch.as_tensor(values, dtype=torch.float32)
        if values.shape != (bins,):
            raise ValueError(f"parameter 'values' must hold one value per bin ({bins}), got shape {tuple(values.shape)}")
        self.register_buffer("values", values, persistent=False)
        if (low is None) != (high is None):
            raise ValueError("parameters 'low' and 'high' go together (OpenVLA's q01 and q99), got one of them")
        self.low = None if low is None else torch.as_tensor(low, dtype=torch.float32)
        self.high = None if high is None else torch.as_tensor(high, dtype=torch.float32)

    @property
    def action_ids(self) -> torch.Tensor:
        """The vocabulary id of each bin, lowest value first: ``vocab_size - 1 - b``."""
        return torch.arange(self.vocab_size - 1, self.vocab_size - 1 - self.bins, -1)

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Action ids ``[B, action_dim]`` -> actions ``[B, action_dim]`` (bin values, un-normalised
        when ``low``/``high`` are set)."""
        bins = self.vocab_size - 1 - tokens
        if bool(((bins < 0) | (bins >= self.bins)).any()):
            raise ValueError(f"ids outside the action ids [{self.vocab_size - self.bins}, {self.vocab_size - 1}]: {tokens.tolist()}")
        x = self.values[bins.to(self.values.device)]
        if self.low is not None:
            x = self.low.to(x) + (x + 1) / 2 * (self.high.to(x) - self.low.to(x))
        return x

    def action_tokens(self, pixel_values, input_ids, attention_mask=None, steps: int | None = None, use_cache: bool = True,
                      **kwargs) -> torch.Tensor:
        """The ids of one control step, ``[B, steps]`` (default ``action_dim``), decoded greedily
        by ``llava.generate`` among the action ids; ``kwargs`` go to ``generate``."""
        steps = steps or self.action_dim
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            out = self.llava.generate(
                pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                min_new_tokens=steps, do_sample=False, use_cache=use_cache,
                logits_processor=LogitsProcessorList([_ActionIdsOnly(self.action_ids)]), **kwargs,
            )
        return out[:, input_ids.shape[1]:]

    def forward(self, pixel_values, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """One control step: the actions ``[B, action_dim]``."""
        return self.tokens_to_actions(self.action_tokens(pixel_values, input_ids, attention_mask, **kwargs))

    def predict_action(self, pixel_values, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """OpenVLA's name for one control step (:meth:`forward`)."""
        return self(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
