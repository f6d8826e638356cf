"""lmms-eval (0.7.x) model plugin: any transformers LLaVA-family checkpoint, pruned by vlmprune.

Registered through the ``lmms_eval.models`` entry point (pyproject.toml:
``vlmprune_llava = "vlmprune.eval.lmms_plugin:MANIFEST"``). lmms-eval 0.7 reads a
:class:`~lmms_eval.models.registry_v2.ModelManifest` there (its ``model_id`` is the name given to
``--model``); the ``register_model`` decorator alone is not read. Example, fully offline::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval \\
        --model vlmprune_llava \\
        --model_args method=visionzip,budget=0.111 \\
        --tasks easyvqa,easyvqa-grid --include_path "$(python -c 'import vlmprune.eval.tasks as t; print(t.task_dir())')" \\
        --batch_size 16 --output_path results/

Across processes (``accelerate launch --num_processes N -m lmms_eval ...``; on a machine without
GPUs ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...``, as the plain
launcher starts one process there), each process loads the model on ``cuda:<local rank>`` (or the
CPU), answers the share of the documents lmms-eval gives its rank in batches of ``--batch_size``,
with ``--num_cpu_threads_per_process`` threads unless ``threads`` says otherwise, and lmms-eval
gathers the answers; this follows lmms-eval's own models (``self.accelerator``, ``_rank``,
``_world_size``).

``--model_args`` (comma-separated ``key=value``; lmms-eval turns ``64`` into an int and ``0.25``
into a float):

``pretrained``
    ``embedded`` (default: the embedded model via ``vlmprune.embedded.load_embedded``), an
    embedded-style directory, or the path / hub id of any LLaVA-family checkpoint.
``method``
    a registered vlmprune method (``vlmprune.methods()``); ``none`` or absent: no pruning.
``budget``
    int = visual tokens kept per image, float in (0, 1] = fraction kept (``1`` is one token;
    write ``1.0`` for all).
``device``, ``dtype`` (``auto``: bfloat16 on CUDA and on CPUs with native bf16, else float32),
``attn_implementation`` (``sdpa``), ``threads``
    where and how the model runs.
``post_prompt``
    text appended to each question (default: none for the embedded model, LLaVA-1.5's
    short-answer instruction otherwise).
``max_new_tokens``
    cap on generated tokens (default: the task's ``generation_kwargs``, else 16).
anything else
    passed to ``vlmprune.wrap`` as the method's options (e.g. ``k_layer=2`` for FastV); an unknown
    option is an error that lists the valid ones.

The batch size is lmms-eval's own flag, ``--batch_size N`` (an integer; ``auto`` is not
supported): lmms-eval always passes it to the model, so ``batch_size`` (and ``max_batch_size``,
or ``device`` together with ``--device``) inside ``--model_args`` is refused with that advice
(:meth:`VlmpruneLlava.create_from_arg_string`) instead of colliding. lmms-eval exits 0 even when
a run fails inside; it logs ``Error during evaluation: ...`` (``--verbosity DEBUG`` shows the
traceback), and only a successful run writes ``*_results.json`` under ``--output_path``.

Decoding is greedy (a task asking for sampling gets a warning and greedy answers). The visual
tokens kept per image (from ``handle.stats``, as in ``vlmprune eval``: the mean over the LLM's
decoder layers of the visual tokens each processes, which is the budget for methods that prune
before the LLM; also the count after the last pruning point and at the LLM input) are
recorded per question: :attr:`VlmpruneLlava.visual_tokens` keeps them all, the offline tasks
report their mean as the ``visual_tokens`` metric of lmms-eval's results file, and a summary is
logged at the end of each ``generate_until`` call.
"""

from __future__ import annotations

import json
import math
from typing import List, Tuple

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger as eval_logger

from vlmprune.eval.runner import LLAVA_SHORT_ANSWER, Predictor, is_embedded, load_model

__all__ = ["MANIFEST", "MODEL_ID", "VlmpruneLlava"]

MODEL_ID = "vlmprune_llava"
_NO_METHOD = (None, "", "none", "None")


class VlmpruneLlava(lmms):
    """A LLaVA-family model answering lmms-eval requests in batches, pruned by ``vlmprune.wrap``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | None = None,
        budget=None,
        device: str | None = "cpu",
        dtype: str = "auto",
        batch_size=1,
        attn_implementation: str = "sdpa",
        post_prompt: str | None = None,
        max_new_tokens: int | None = None,
        threads: int | None = None,
        max_batch_size=None,  # passed by lmms-eval; batches are fixed-size here
        **method_options,
    ) -> None:
        super().__init__()
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = self._join_processes(str(device))
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"vlmprune_llava: batch_size must be an integer, got {batch_size!r} ('auto' is not supported)")
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"vlmprune_llava: batch_size must be >= 1, got {batch_size!r}")
        pretrained = None if pretrained in (None, "", "embedded") else str(pretrained)
        self.pretrained = pretrained or "embedded"
        self._model, self._processor = load_model(pretrained, device=device, dtype=dtype,
                                                  attn_implementation=attn_implementation)
        self._device = device
        if post_prompt is None:
            post_prompt = "" if is_embedded(pretrained) else LLAVA_SHORT_ANSWER
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens is not None else None
        self.predictor = Predictor(self._model, self._processor, post_prompt=post_prompt)

        self.method = None if method in _NO_METHOD else str(method)
        self.budget = budget
        self.method_options = dict(method_options)
        self.handle = None
        if self.method is None:
            if budget is not None or method_options:
                raise ValueError(
                    "vlmprune_llava: budget/method options given without a method; pass method=<name> "
                    "(see vlmprune.methods())"
                )
        else:
            import vlmprune

            if budget is None:
                raise ValueError(f"vlmprune_llava: method={self.method!r} needs a budget (int tokens per image or float fraction)")
            self.handle = vlmprune.wrap(self._model, method=self.method, budget=budget, **self.method_options)
            self.predictor.handle = self.handle
        #: one record per answered request: task, doc_id, question id (if any), visual tokens per image
        self.visual_tokens: list[dict] = []
        self._warned_sampling = False
        eval_logger.info(
            f"vlmprune_llava: {self.pretrained} on {device} (rank {self._rank} of {self._world_size}, "
            f"{torch.get_num_threads()} threads), method={self.method or 'none'}, budget={budget}, "
            f"options={self.method_options}, batch_size={self.batch_size_per_gpu}"
        )

    def _join_processes(self, device: str) -> str:
        """Rank, world size and this rank's device under ``accelerate launch``, as lmms-eval's own models
        do: each process answers its share of the questions (lmms-eval shards the documents and gathers
        the results), on ``cuda:<local rank>`` when ``device`` is CUDA, else on the CPU. The model is not
        wrapped in DDP (inference only: there is nothing to synchronise)."""
        import os

        from accelerate import Accelerator

        self.accelerator = Accelerator()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and self.accelerator.num_processes != world:
            raise RuntimeError(
                f"vlmprune_llava: WORLD_SIZE={world} but accelerate set up {self.accelerator.num_processes} "
                "process(es); without GPUs, launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                "--num_processes N -m lmms_eval ...` (the plain launcher starts one process on a CPU)"
            )
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if self._world_size > 1 and device.startswith("cuda"):
            device = f"cuda:{self.accelerator.local_process_index}"
        if self._world_size > 1 and self.accelerator.is_main_process:
            eval_logger.info(f"vlmprune_llava: {self._world_size} processes, each answering its share of the documents")
        return device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval's constructor from ``--model_args``; a key also given by one of lmms-eval's
        own flags (``batch_size`` always, ``max_batch_size`` and ``device`` when set) is refused
        naming that flag, before anything loads."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        flags = {k: v for k, v in (additional_config or {}).items() if v is not None}
        both = sorted(set(args) & set(flags))
        if both:
            raise ValueError(
                f"vlmprune_llava: {', '.join(both)} in --model_args collides with lmms-eval's own flag(s) "
                f"{', '.join('--' + k for k in both)}: give {' '.join(f'--{k} {args[k]}' for k in both)} "
                "on the lmms-eval command line instead"
            )
        return cls(**args, **flags)

    # -- what lmms-eval reads ------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.predictor.tokenizer

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def summary(self) -> dict:
        """Method, budget and the mean visual tokens kept per image over every request so far."""
        values = [r["visual_tokens"] for r in self.visual_tokens if not math.isnan(r["visual_tokens"])]
        return {
            "pretrained": self.pretrained,
            "method": self.method or "none",
            "budget": self.budget,
            "options": self.method_options,
            "requests": len(self.visual_tokens),
            "visual_tokens_mean": sum(values) / len(values) if values else math.nan,
        }

    # -- requests ------------------------------------------------------------------------------------
    def generate_until(self, requests: List[Instance]) -> List[str]:
        from tqdm import tqdm

        from vlmprune.eval.tasks import record_visual_tokens

        results: list[str | None] = [None] * len(requests)
        # group by task and generation settings (so that one batch shares them), keep order inside
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, _, _, task, split = req.args
            key = (task, split, json.dumps(gen_kwargs or {}, sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        bar = tqdm(total=len(requests), disable=(self.rank != 0), desc="vlmprune_llava")
        for (task, split, _), indices in groups.items():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until, max_new = self._generation_settings(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts, visuals, docs = [], [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, _, _ = requests[i].args
                    doc = self.task_dict[task][split][doc_id]
                    vis = doc_to_visual(doc) if doc_to_visual is not None else []
                    vis = [v for v in (vis or []) if v is not None]
                    if any(not hasattr(v, "convert") for v in vis):
                        raise NotImplementedError(
                            f"vlmprune_llava handles image inputs only (task {task!r} gave "
                            f"{sorted({type(v).__name__ for v in vis})})"
                        )
                    texts.append(self._strip_image_tokens(context))
                    visuals.append([v.convert("RGB") for v in vis])
                    docs.append((doc_id, doc))
                answers, tokens = self.predictor.generate(visuals, texts, max_new_tokens=max_new, until=until)
                for i, answer, n, (doc_id, doc) in zip(chunk, answers, tokens, docs):
                    results[i] = answer
                    qid = doc.get("id") if hasattr(doc, "get") else None
                    self.visual_tokens.append({"task": task, "doc_id": doc_id, "id": qid, "visual_tokens": n.kept,
                                               "visual_tokens_final": n.final, "llm_input_tokens": n.llm_input})
                    if qid is not None:
                        record_visual_tokens(qid, n.kept)
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), answer)
                bar.update(len(chunk))
        bar.close()
        s = self.summary
        where = f" on rank {self._rank} of {self._world_size}" if self._world_size > 1 else ""
        eval_logger.info(
            f"vlmprune_llava: method={s['method']} budget={s['budget']}: {s['visual_tokens_mean']:.1f} visual "
            f"tokens kept per image (mean over {s['requests']} requests{where})"
        )
        return results

    def _generation_settings(self, gen_kwargs: dict):
        until = gen_kwargs.get("until")
        if isinstance(until, str):
            until = [until]
        until = [u for u in (until or []) if u]
        max_new = gen_kwargs.get("max_new_tokens", 16)
        if self.max_new_tokens is not None:
            max_new = min(int(max_new), self.max_new_tokens)
        sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0
        if sampling and not self._warned_sampling:
            eval_logger.warning("vlmprune_llava decodes greedily; the task's sampling settings are ignored")
            self._warned_sampling = True
        return until, int(max_new)

    def _strip_image_tokens(self, context: str) -> str:
        """Tasks that spell out ``<image>`` in their prompt: the chat template places images itself."""
        token = getattr(self._processor, "image_token", "<image>")
        return context.replace(token, "").strip()

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        raise NotImplementedError(
            "vlmprune_llava implements generate_until only (the offline tasks easyvqa and easyvqa-grid are "
            "generative); loglikelihood tasks are not supported"
        )

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("vlmprune_llava does not implement multi-round generation")

    def clean(self):
        if self.handle is not None:
            self.handle.unwrap()
            self.handle = None
            self.predictor.handle = None
        super().clean()


#: what lmms-eval's ``lmms_eval.models`` entry point must hold (a ModelManifest, not a class)
MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VlmpruneLlava")
