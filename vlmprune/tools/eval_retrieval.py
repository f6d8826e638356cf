"""``vlmprune eval --task easyvqa-retrieval`` (= ``python -m vlmprune.tools.eval_retrieval``): the
embedded retriever (``assets/embedded_colpali``) on ``easyvqa-retrieval``
(:mod:`vlmprune.embedded.retrieval_task`) with its pages pruned and compressed.

Rows (:func:`runs`): the full multi-vector index (float16 values); each pruning method at the
retriever's output stage (DivPrune, uniform, random, and HPC-ColPali's attention-guided pruning
with ``codebook=0``) keeping 60 / 40 / 20 % of the 256 patches; K-means codes (HPC-ColPali's
codebook, :class:`vlmprune.retrieval.Codebook`) at K = 64 / 128 / 256 over all patches; binary
codes (K = 256, Hamming); and HPC-ColPali's combinations (its pruning + codes K = 256, + binary).
Each row gets nDCG@5 / nDCG@10 / Recall@1, the mean stored bytes per page (its kept vectors,
the prompt's text vectors included: float16 values 2 bytes each, a code 1 byte, binary packed
bits; the shared codebook apart, ``codebook_bytes``) and the scoring time per query over the
whole collection (:meth:`vlmprune.retrieval.MultiVectorIndex.scores`, queries in batches of 16,
median of 3 passes, divided by the queries).

The tower's features are computed once per page and fed through
:class:`vlmprune.embedded.colpali.FeatureTower` (pruning acts after the language model, so every
row sees the same features). Writes ``results.json``, ``results.csv``, ``table.md`` and
``quality_vs_bytes.png`` under ``--out``; ``--update`` merges the rows run into an existing
``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

import vlmprune
from vlmprune.embedded import colpali
from vlmprune.embedded import retrieval_task as task
from vlmprune.retrieval import MultiVectorIndex

OUT = Path(__file__).resolve().parents[2] / "assets" / "benchmark_retrieval"
BUDGETS = (0.6, 0.4, 0.2)
CODEBOOKS = (64, 128, 256)
PRUNERS = ("divprune", "uniform", "random", "hpc_colpali")
FIELDS = ("method", "budget", "storage", "vectors", "bytes_per_document", "ndcg@5", "ndcg@10", "recall@1", "score_ms")


def runs(budgets=BUDGETS, codebooks=CODEBOOKS, pruners=PRUNERS) -> list[tuple]:
    """``(row name, method or None, budget, codebook K or None, binary)`` for every row."""
    out = [("full", None, 1.0, None, False)]
    out += [(f"{m} (attention-guided)" if m == "hpc_colpali" else m, m, b, None, False) for m in pruners for b in budgets]
    out += [(f"codes K={k}", None, 1.0, k, False) for k in codebooks]
    k = max(codebooks)
    out += [(f"binary K={k}", None, 1.0, k, True)]
    out += [(f"hpc_colpali + codes K={k}", "hpc_colpali", b, k, False) for b in budgets]
    out += [(f"hpc_colpali + binary K={k}", "hpc_colpali", b, k, True) for b in budgets]
    return out


def tower_features(model, images, processor, batch: int = 16) -> torch.Tensor:
    """``[N, 256, width]``: the tower's last layer output without CLS, before its final layer norm
    (what :class:`~vlmprune.embedded.colpali.FeatureTower` reads)."""
    from vlmprune.embedded.training import vision_features

    tower = model.vlm.vision_tower
    return torch.cat([vision_features(tower, processor(images[s:s + batch], return_tensors="pt")["pixel_values"])
                      for s in range(0, len(images), batch)])


def page_embeddings(model, tokenizer, feats: torch.Tensor, method=None, budget=1.0, batch: int = 16) -> list[torch.Tensor]:
    """The pages' embedding batches, wrapped with ``method`` at ``budget`` (None: unwrapped)."""
    def run():
        with torch.no_grad():
            return [model(**colpali.document_inputs(feats[s:s + batch], tokenizer)).embeddings
                    for s in range(0, len(feats), batch)]

    if method is None:
        return run()
    options = {"codebook": 0} if method == "hpc_colpali" else {}
    with vlmprune.wrap(model, method, budget=budget, **options):
        return run()


def score_time(index: MultiVectorIndex, queries: torch.Tensor, batch: int = 16, passes: int = 3) -> tuple[torch.Tensor, float]:
    """``(scores [Q, N], ms per query)``: the median of ``passes`` timed passes."""
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        scores = torch.cat([index.scores(queries[s:s + batch]) for s in range(0, len(queries), batch)])
        times.append(time.perf_counter() - t)
    return scores, 1e3 * statistics.median(times) / len(queries)


def run_benchmark(model, tokenizer, feats, queries, rows=None, seed: int = 0, log=print) -> list[dict]:
    """Every row of ``rows`` (default :func:`runs`) on the pages' features ``feats`` and the
    :class:`~vlmprune.embedded.retrieval_task.Query` list ``queries`` (query ``i``'s page: ``q.page``)."""
    tower = model.vlm.vision_tower
    model.vlm.vision_tower = colpali.FeatureTower(tower)
    try:
        with torch.no_grad():
            q_emb = model(**colpali.query_inputs([q.text for q in queries], tokenizer)).embeddings
        relevant = [q.page for q in queries]
        out, cache, books = [], {}, {}
        for name, method, budget, k, binary in rows or runs():
            key = (method, budget)
            if key not in cache:
                cache[key] = page_embeddings(model, tokenizer, feats, method, budget)
            if (key, k) in books:  # codes and binary codes of the same pages share one K-means fit
                index = MultiVectorIndex("binary" if binary else "codes", books[key, k])
                for batch in cache[key]:
                    index.add(batch)
            else:
                index = MultiVectorIndex.build(cache[key], codebook=k, binary=binary, seed=seed)
                books[key, k] = index.codebook
            scores, ms = score_time(index, q_emb)
            stored = index.document_bytes()
            if index.mode == "float":
                stored = [b // 2 for b in stored]  # float16 values (the index holds float32)
            row = {"method": name, "budget": budget,
                   "storage": "float16" if k is None else f"{'binary' if binary else 'codes'} K={k}",
                   "vectors": round(statistics.mean(d.shape[0] for d in index.docs), 1),
                   "bytes_per_document": round(statistics.mean(stored), 1),
                   **{m: round(v, 4) for m, v in task.metrics(scores, relevant).items()},
                   "score_ms": round(ms, 3), "codebook_bytes": index.codebook_bytes()}
            out.append(row)
            log(_fmt(row))
        return out
    finally:
        model.vlm.vision_tower = tower


def _fmt(r: dict) -> str:
    return (f"{r['method']:28s} keep {r['budget']:.1f} {r['storage']:13s} {r['vectors']:6.1f} vectors "
            f"{r['bytes_per_document']:9.1f} B  nDCG@5 {r['ndcg@5']:.3f} nDCG@10 {r['ndcg@10']:.3f} "
            f"R@1 {100 * r['recall@1']:5.1f} %  {r['score_ms']:.2f} ms/query")


def table(rows: list[dict]) -> str:
    """Markdown: one line per row."""
    lines = ["| index | keep | stored as | vectors / page | bytes / page | nDCG@5 | nDCG@10 | Recall@1 | ms / query |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['budget']:g} % | {r['storage']} | {r['vectors']:g} | "
                     f"{r['bytes_per_document']:,.0f} | {r['ndcg@5']:.3f} | {r['ndcg@10']:.3f} | "
                     f"{100 * r['recall@1']:.1f} % | {r['score_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families: dict = {}
    for r in rows:
        fam = r["method"].split(" (")[0] if r["storage"] == "float16" else r["method"]
        families.setdefault(fam, []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r["bytes_per_document"])
        marker = "*" if fam == "full" else "s" if "codes" in fam else "^" if "binary" in fam else "o"
        ax.plot([r["bytes_per_document"] for r in rs], [r["ndcg@5"] for r in rs], marker=marker, label=fam,
                ls="-" if len(rs) > 1 else "none")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per page (log)")
    ax.set_ylabel("nDCG@5")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tiny_retriever(seed: int = 0):
    """A random-weight ColPali shaped like the embedded one (a 2-layer 32-wide Dinov2 tower at
    224 px / patch 14, a 1-layer 32-wide Gemma, 16-d embeddings), eager attention, with the
    embedded retriever's tokenizer: ``(model, tokenizer)``. For tests and dry runs."""
    from transformers import (
        ColPaliConfig,
        ColPaliForRetrieval,
        Dinov2Config,
        PaliGemmaConfig,
    )

    tok = colpali.build_tokenizer()
    vlm = colpali.build_config(tok).vlm_config
    vision = Dinov2Config(**dict(vlm.vision_config.to_dict(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, out_features=None, out_indices=None,
                                 stage_names=None))
    text = dict(vlm.text_config.to_dict(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, head_dim=16)
    cfg = ColPaliConfig(vlm_config=PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text,
                                                   image_token_id=vlm.image_token_id, projection_dim=32,
                                                   vocab_size=vlm.text_config.vocab_size), embedding_dim=16)
    torch.manual_seed(seed)
    model = ColPaliForRetrieval(cfg).eval()
    model.set_attn_implementation("eager")
    colpali.drop_cls(model)
    return model, tok


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune eval --task easyvqa-retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=task.TASK, choices=(task.TASK,))
    p.add_argument("--model", default=None,
                   help="retriever directory (default: assets/embedded_colpali); 'tiny': a random ColPali from a config")
    p.add_argument("--pages", type=int, default=task.DEFAULT_TEST["n"], help="pages in the test collection")
    p.add_argument("--seed", type=int, default=task.DEFAULT_TEST["seed"])
    p.add_argument("--methods", type=_csv, default=None, help=f"pruning methods, of {list(PRUNERS)} (default: all)")
    p.add_argument("--budgets", type=_csv, default=[str(b) for b in BUDGETS], help="fractions of patches kept")
    p.add_argument("--codebooks", type=_csv, default=[str(k) for k in CODEBOOKS], help="K-means sizes K (<= 256)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--update", action="store_true", help="merge the rows run into --out's results.json")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    where = f"vlmprune eval --task {task.TASK}"
    pruners = tuple(args.methods or PRUNERS)
    unknown = sorted(set(pruners) - set(PRUNERS))
    if unknown:
        raise SystemExit(f"{where}: --methods: unknown {unknown}; choose from {list(PRUNERS)}")
    try:
        budgets = [float(b) for b in args.budgets]
        codebooks = [int(k) for k in args.codebooks]
    except ValueError:
        raise SystemExit(f"{where}: --budgets takes fractions kept, --codebooks ints, got {args.budgets}, {args.codebooks}")
    if not budgets or any(not 0 < b <= 1 for b in budgets) or not codebooks or any(not 1 <= k <= 256 for k in codebooks):
        raise SystemExit(f"{where}: --budgets must be fractions in (0, 1], --codebooks ints in [1, 256]")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.model == "tiny":
        model, tok = tiny_retriever(args.seed)
    else:
        model, tok = colpali.load_retriever(args.model, attn_implementation="eager")
    pages, queries = task.collection("test", args.pages, args.seed)
    feats = tower_features(model, [p.image() for p in pages], colpali.image_processor())
    log = print
    log(f"{len(pages)} pages encoded ({(time.time() - t0) / 60:.1f} min)")
    rows = run_benchmark(model, tok, feats, queries, runs(budgets, codebooks, pruners), args.seed, log)
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = {"task": task.TASK, "pages": len(pages), "queries": len(queries), "seed": args.seed, "threads": args.threads,
            "model": str(args.model or "assets/embedded_colpali"), "embedding_dim": model.config.embedding_dim,
            **task.hard_negative_stats(queries), "minutes": round((time.time() - t0) / 60, 1),
            "torch": torch.__version__, "transformers": transformers.__version__}
    results = args.out / "results.json"
    if args.update and results.exists():
        old = json.loads(results.read_text())["rows"]
        done = {(r["method"], r["budget"]) for r in rows}
        rows = [r for r in old if (r["method"], r["budget"]) not in done] + rows
    results.write_text(json.dumps({"config": meta, "rows": rows}, indent=2) + "\n")
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (args.out / "table.md").write_text(table(rows))
    plot(rows, args.out / "quality_vs_bytes.png", f"{task.TASK}: {len(pages)} pages, {len(queries)} queries")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
