"""Evaluation bridges, the top layer of `mllm` (nothing else in `mllm` imports them):
    lmms_manifest  the lmms-eval entry point (`semhitok`), importable without torch
    lmms_model     the lmms-eval model class: a SemHiTok MLLM answering through `mllm.sampling`
    lmms_tasks     offline lmms-eval tasks in the built-in POPE / MME schemas (eval/build_lmms_tasks.py)
    geneval        GenEval-layout image generation and scoring (eval/geneval.py)
This file imports nothing, so lmms-eval loading the manifest stays light."""
