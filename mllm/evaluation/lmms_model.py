"""The lmms-eval model `semhitok` (registered by the entry point in mllm/evaluation/lmms_manifest.py): a SemHiTok MLLM
answering lmms-eval's `generate_until` requests in left-padded batches.

    lmms-eval --model semhitok --model_args pretrained=DIR[,device=auto,template=auto,seed=0] --batch_size 8 ...
    python eval/run_lmms.py --tasks mme,pope --model-path DIR --batch-size 8      (the same, offline-friendly)

Code shipped with the checkpoint runs only with model_args `trust_remote_code=True` (run_lmms: --trust-remote-code).

A request is (question text, gen_kwargs, doc_to_visual, doc_id, task, split). Its image (at most one) is resized and
centre-cropped like `semhitok.runtime.load_image` does, encoded by the checkpoint's SemHiTok, and placed in the first
user turn of the model's conversation template (`ChatSession.prompt_ids`). Requests with the same gen_kwargs are decoded
together, longest prompt first, `batch_size` at a time (`generate_texts`): greedy at temperature 0 or do_sample
False, else sampled with row r of a batch seeded `seed + r`. Generation ends at eos / end of turn, max_new_tokens or
the context; the answer is cut at the first `until` string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from loguru import logger
from PIL import Image, ImageOps
from torch import Tensor
from tqdm import tqdm

from mllm.sampling import ChatSession, SamplingConfig, check_length, generate_texts, load_for_inference
from semhitok.runtime import resize_center_crop, resolve_device, to_rgb, to_tensor

GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "num_beams"}


def sampling_config(gen_kwargs: dict[str, Any], seed: int) -> SamplingConfig:
    """lmms-eval gen_kwargs -> SamplingConfig. Greedy when temperature is 0 (the default) or do_sample is False; top_p
    0 or None means off. ValueError for beam search; other unknown keys are ignored with a warning."""
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise ValueError(f"the semhitok model does not do beam search: got num_beams={gen_kwargs['num_beams']}")
    ignored = sorted(set(gen_kwargs) - GEN_KWARGS)
    if ignored:
        logger.warning(f"semhitok: ignoring gen_kwargs {ignored}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    greedy = temperature == 0 or gen_kwargs.get("do_sample") is False
    top_p = float(gen_kwargs.get("top_p") or 1.0)
    return SamplingConfig(temperature=0.0 if greedy else temperature, top_k=int(gen_kwargs.get("top_k") or 0),
                          top_p=1.0 if greedy else top_p, seed=seed,
                          max_new_tokens=int(gen_kwargs.get("max_new_tokens") or SamplingConfig.max_new_tokens))  # fmt: skip


def stop_strings(gen_kwargs: dict[str, Any]) -> list[str]:
    """gen_kwargs["until"] (a string, a list of strings or None) -> the non-empty stop strings."""
    until = gen_kwargs.get("until") or []
    return [s for s in ([until] if isinstance(until, str) else until) if s]


def image_pixels(image: Image.Image, size: int) -> Tensor:
    """PIL image -> (3, size, size) float32 in [-1, 1], by the conventions of `semhitok.runtime.load_image`: EXIF
    orientation, 8-bit RGB (transparency on white), short side resized to `size`, centre crop."""
    return to_tensor(resize_center_crop(to_rgb(ImageOps.exif_transpose(image)), size))


def parse_device(text: str) -> torch.device:
    """auto / cpu / cuda / cuda:N through semhitok's resolve_device (one-line ConfigError for a missing device)."""
    return resolve_device(text, option="device")


class SemHiTokLMMS(lmms):
    """lmms-eval's simple-model interface over `load_for_inference(pretrained)`."""

    is_simple = True

    def __init__(self, pretrained: str, device: str = "auto", batch_size: int | str = 1, template: str = "auto",
                 seed: int | str = 0, trust_remote_code: bool = False, precision: str = "auto",
                 max_batch_size: int | None = None, **unknown) -> None:  # fmt: skip
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args for semhitok: {', '.join(sorted(unknown))} "
                             "(known: pretrained, device, batch_size, template, seed, trust_remote_code, precision)")  # fmt: skip
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(trust_remote_code, bool):  # lmms-eval parses True/False; anything else is a typo
            raise ValueError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        self.run = load_for_inference(pretrained, parse_device(str(device)), trust_remote_code, str(precision))
        self.batch_size, self.template, self.seed = int(batch_size), template, int(seed)
        self.known = torch.arange(self.run.model.vocab.offset) < len(self.run.tokenizer)  # ids the tokenizer can write

    # ------------------------------------------------------------------------------------------------ requests

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in request order."""
        collator = Collator([r.args for r in requests], lambda args: (-len(args[0]), args[0]), grouping=True)
        answers: list[str] = []
        with tqdm(total=len(requests), desc="semhitok", disable=self.rank != 0) as bar:
            for chunk in collator.get_batched(n=self.batch_size):
                answers += self._answer(chunk)
                bar.update(len(chunk))
        return collator.get_original(answers)

    def _answer(self, chunk: Sequence[tuple]) -> list[str]:
        """Requests with the same gen_kwargs -> their answers, decoded as one batch."""
        contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
        gen_kwargs = all_gen_kwargs[0]
        cfg, until = sampling_config(gen_kwargs, self.seed), stop_strings(gen_kwargs)
        docs = [self.task_dict[t][s][d] for t, s, d in zip(tasks, splits, doc_ids, strict=True)]
        images = self._image_ids([list(f(doc) or []) for f, doc in zip(doc_to_visual, docs, strict=True)], tasks, doc_ids)
        sessions = [ChatSession(self.run.model, self.run.tokenizer, image, cfg, self.template) for image in images]
        prompts = [session.prompt_ids(context) for session, context in zip(sessions, contexts, strict=True)]
        for prompt, task, doc_id in zip(prompts, tasks, doc_ids, strict=True):
            check_length(self.run.model, len(prompt), 1, f"the prompt of {task} doc {doc_id}")

        def done(p: int, ids: list[int]) -> bool:
            return bool(until) and any(s in self._decode(ids) for s in until)

        new = generate_texts(self.run.model, prompts, cfg, sessions[0].stop_ids(), self.known, done)
        answers = [cut(self._decode(ids.tolist()), until) for ids in new]
        for context, answer in zip(contexts, answers, strict=True):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answers

    def _image_ids(self, visuals: Sequence[Sequence], tasks: Sequence[str], doc_ids: Sequence[int]) -> list[Tensor | None]:
        """Each doc's visuals (at most one PIL image) -> its (1, h·w) image ids or None; the images of a chunk are
        encoded in one batch."""
        for v, task, doc_id in zip(visuals, tasks, doc_ids, strict=True):
            if len(v) > 1 or any(not isinstance(x, Image.Image) for x in v):
                raise ValueError(f"{task} doc {doc_id} gives {len(v)} visuals ({', '.join(type(x).__name__ for x in v)}); "
                                 "the semhitok model reads at most one image per question")  # fmt: skip
        with_image = [k for k, v in enumerate(visuals) if v]
        out: list[Tensor | None] = [None] * len(visuals)
        if with_image:
            size, model = self.run.semhitok.config.image_size, self.run.model
            pixels = torch.stack([image_pixels(visuals[k][0], size) for k in with_image])  # (B, 3, H, W)
            ids = model.vocab.to_ids(self.run.semhitok.encode(pixels.to(model.code_sem.device)))  # (B, h·w)
            for k, row in zip(with_image, ids, strict=True):
                out[k] = row[None]
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.run.tokenizer.decode(ids, skip_special_tokens=True)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the semhitok model answers generate_until tasks only (such as mme, pope); "
                                  "loglikelihood / multiple_choice tasks are not supported")  # fmt: skip

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the semhitok model does not implement generate_until_multi_round tasks")


def cut(text: str, until: Sequence[str]) -> str:
    """The answer before the first stop string, stripped."""
    for s in until:
        text = text.split(s)[0]
    return text.strip()
