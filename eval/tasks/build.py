"""Write the offline tasks' images (and, with ``--index``, their committed question index).

    python -m vlmprune.eval.tasks.build                 # PNGs of both tasks into the cache
    python -m vlmprune.eval.tasks.build --tasks easyvqa --cache /tmp/imgs
    python -m vlmprune.eval.tasks.build --index         # regenerate eval/tasks/data/*.jsonl too

Images go to ``$VLMPRUNE_CACHE/tasks`` (default ``~/.cache/vlmprune/tasks``); the lmms-eval tasks
and ``vlmprune eval`` also build missing images on first use, so running this is optional.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import TASKS, ensure_images, generate_index, image_cache_dir, index_path, write_index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmprune.eval.tasks.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {sorted(TASKS)}")
    p.add_argument("--cache", type=Path, default=None, help=f"image directory (default {image_cache_dir()})")
    p.add_argument("--index", action="store_true",
                   help="also regenerate the committed question index eval/tasks/data/<task>.jsonl")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; choose from {sorted(TASKS)}")
    cache = args.cache or image_cache_dir()
    for task in tasks:
        if args.index:
            rows, meta, _ = generate_index(task)
            write_index(task, rows, meta)
            print(f"{task}: wrote {len(rows)} questions over {meta['images']} images to {index_path(task)}")
        n = ensure_images(task, cache=cache, progress=True)
        print(f"{task}: {n} image(s) written, all present under {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
