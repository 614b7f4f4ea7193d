"""`make demo`: the shipped demo MLLM (SmolLM2-135M-Instruct + SemHiTok, trained on the synthetic domain) end to end.

  1. loads the checkpoint (default: the shipped mllm/demo/mllm, its tokenizer in mllm/demo/tokenizer),
  2. generates images for a few prompts,
  3. answers a few questions about held-out images (the true answers printed beside them),
  4. runs the synthetic GenEval (held-out prompts, scored by the exact detector, every tag and overall), as asked
     and with prompt expansion (the model first writes each prompt out as a scene description, then draws it),
  5. runs POPE (random / popular / adversarial) and MME on held-out synthetic scenes through lmms-eval's own task
     code (eval/run_lmms.py's model and local tasks),
  6. measures the tokenizer's reconstruction PSNR on the held-out images,
and writes everything under --out (report.json has every number and setting). Under 10 minutes on 2 CPU cores.

    python scripts/demo.py [--checkpoint mllm/demo/mllm] [--out outputs/demo] [--geneval-prompts 60]
                           [--heldout 40] [--seed 1234] [--device cpu]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from mllm.cli import checkpoint_dir, load, one_line_errors, save_images
from mllm.evaluation.geneval import (
    StaleImagesError,
    claim_folder,
    expand_entries,
    format_summary,
    generate,
    image_origin,
    judge_images,
    score_folder,
    synthetic_metadata,
    write_metadata,
)
from mllm.sampling import ChatSession, Inference, SamplingConfig, generate_images
from mllm.synthetic import Scene
from mllm.synthetic.dataset import write_dataset
from mllm.synthetic.detector import reconstruct_and_detect
from mllm.synthetic.questions import qa_pool
from semhitok.metrics import psnr
from semhitok.runtime import Parser, fail, load_image, positive_int, to_tensor

REPO = Path(__file__).resolve().parents[1]
PROMPTS = (
    "a photo of a red circle",
    "a photo of two blue squares",
    "a photo of a yellow star left of a green triangle",
    "a photo of a purple diamond above an orange cross",
)
GENERATION = SamplingConfig(temperature=1.0, top_k=0, cfg_scale=3.0)  # the demo's image sampling settings


def banner(step: int, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def describe_checkpoint(run: Inference) -> str:
    tok = run.semhitok.config
    return (f"{run.model.config.train_llm} LLM {Path(run.model.config.llm).name}, SemHiTok {tok.image_size}px "
            f"{tok.grid}x{tok.grid} tokens, K={tok.K} semantic x m={tok.m} texture codes")  # fmt: skip


def generate_step(run: Inference, out: Path, seed: int) -> list[str]:
    images = generate_images(run.model, list(PROMPTS), replace(GENERATION, seed=seed), tokenizer=run.tokenizer)
    paths = save_images(run.decode(images), out / "generate" / "grid.png", per_row=len(PROMPTS))
    return [str(p) for p in paths]


def questions_step(run: Inference, folder: Path, rows: list[dict], n: int, seed: int) -> list[dict]:
    """A few of the synthetic question pool's questions per held-out image, answered greedily by the model."""
    rng = np.random.default_rng(seed)
    answered = []
    for row in rows[:n]:
        scene = Scene.from_dict(row["scene"])
        session = ChatSession(run.model, run.tokenizer, run.encode_image(folder / row["image"]))
        for question, truth in [qa for qa in qa_pool(scene, rng) if not qa[0].startswith("Describe")][:2]:
            answered.append({"image": str(folder / row["image"]), "question": question, "answer": session.ask(question),
                             "truth": truth})  # fmt: skip
    return answered


def geneval_step(run: Inference, out: Path, n_prompts: int, seed: int, expand: bool = False) -> dict:
    """The synthetic GenEval, as many prompts per decoding call as half the free memory holds (`prompts_per_call`),
    into out/geneval; with `expand`, each prompt first written out by the model as a detailed scene description
    (`expand_captions`, prompt expansion) and drawn from that, into out/geneval-expanded."""
    entries, folder = synthetic_metadata(n_prompts, seed), out / ("geneval-expanded" if expand else "geneval")
    entries = expand_entries(run, entries) if expand else entries
    try:
        claim_folder(folder, image_origin(run, GENERATION))
    except StaleImagesError:  # the demo's images are its own: made by another checkpoint, they are made again
        shutil.rmtree(folder)
    write_metadata(folder / "metadata.jsonl", entries)
    generate(run, entries, folder, 1, GENERATION)
    scored = score_folder(folder)
    (folder / "results.json").write_text(json.dumps(scored, indent=1) + "\n")
    return scored["summary"]


class StepError(Exception):
    """A demo step's command failed; the message names the step, the command and its cause in one line."""


def run_step(step: str, cmd: list[str], log: Path) -> str:
    """Run `cmd` (a Python script), keeping its whole stderr in `log`; its stdout. A failure raises StepError with
    the last line the command printed on stderr (its error, or the last line of its traceback)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stderr)
    if proc.returncode:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        cause = lines[-1] if lines else "it printed nothing on stderr"
        raise StepError(f"step {step}: {Path(cmd[1]).name} exited with status {proc.returncode}: {cause} "
                        f"(full output: {log})")  # fmt: skip
    return proc.stdout


def lmms_step(checkpoint: Path, heldout: Path, out: Path, batch_size: int) -> dict:
    """POPE (3 splits) and MME on the held-out scenes, as a user runs them: eval/build_lmms_tasks.py then
    eval/run_lmms.py (lmms-eval's own pope / mme task code). Returns lmms-eval's results JSON."""
    tasks, results = out / "lmms_tasks", out / "lmms_eval"
    build = [sys.executable, str(REPO / "eval" / "build_lmms_tasks.py"), "synthetic", "--data", str(heldout),
             "--out", str(tasks), "--name", "demo"]  # fmt: skip
    run = [sys.executable, str(REPO / "eval" / "run_lmms.py"), "--tasks", "demo_pope,demo_mme", "--model-path",
           str(checkpoint), "--include-path", str(tasks), "--output", str(results), "--batch-size", str(batch_size),
           "--device", "cpu"]  # fmt: skip
    run_step("5 (build the POPE/MME tasks)", build, out / "logs" / "build_lmms_tasks.log")
    stdout = run_step("5 (POPE/MME through lmms-eval)", run, out / "logs" / "run_lmms.log")
    print("    " + stdout.strip().replace("\n", "\n    "))
    newest = max(results.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())["results"]


def reconstruction_step(run: Inference, folder: Path, rows: list[dict]) -> dict:
    """The tokenizer alone on the held-out renders: PSNR, and what the exact detector still reads after encode ->
    decode (per attribute, and the GenEval judge on the scenes built for GenEval entries): the ceiling that decoding
    puts on the GenEval score of generated images."""
    size = run.semhitok.config.image_size
    images = torch.stack([to_tensor(load_image(folder / r["image"], size)) for r in rows])
    scenes = [Scene.from_dict(r["scene"]) for r in rows]
    detector, recon, pil = reconstruct_and_detect(run.semhitok, images, scenes)
    ceiling = judge_images([r["geneval"] for r in rows], pil)
    return {"psnr": float(psnr(images, recon).mean()), "detector": detector,
            "geneval_judge": None if ceiling is None else ceiling["overall"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="MLLM checkpoint (default: the shipped demo one)")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--geneval-prompts", type=positive_int, default=60, help="held-out GenEval-style prompts")
    p.add_argument("--heldout", type=positive_int, default=40, help="held-out scenes for POPE, MME and PSNR")
    p.add_argument("--questions", type=positive_int, default=3, help="images to ask questions about")
    p.add_argument("--seed", type=int, default=1234, help="held-out seed (training used 0)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="POPE / MME questions decoded together "
                   "(image generation batches by memory)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        run_demo(args, p.prog)
    except StepError as err:
        fail(p.prog, str(err))


def run_demo(args, prog: str) -> None:
    """Every step; report.json is written even when a step fails (with what the earlier steps measured)."""
    start, report = time.perf_counter(), {}
    try:
        run_steps(args, prog, report, start)
    finally:
        if report:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndone in {time.perf_counter() - start:.0f}s; outputs in {args.out}/ (report.json, generate/, geneval/, "
          "heldout/)")  # fmt: skip


def run_steps(args, prog: str, report: dict, start: float) -> None:
    with one_line_errors(prog):
        run = load(args)
        banner(1, f"loaded {checkpoint_dir(args.checkpoint)}: {describe_checkpoint(run)} "
                  f"({time.perf_counter() - start:.0f}s)")  # fmt: skip
        report.update(checkpoint=str(checkpoint_dir(args.checkpoint)), sampling=asdict(GENERATION))
        size = run.semhitok.config.image_size
        heldout = write_dataset(args.out / "heldout", args.heldout, size, args.seed)
        rows = [json.loads(line) for line in (heldout / "scenes.jsonl").read_text().splitlines()]

        report["generated"] = generate_step(run, args.out, args.seed)
        banner(2, f"generated {len(PROMPTS)} images -> {args.out / 'generate'}")
        for prompt in PROMPTS:
            print(f"    {prompt}")

        report["questions"] = questions_step(run, heldout, rows, args.questions, args.seed)
        banner(3, "questions about held-out images (model answer | truth)")
        for qa in report["questions"]:
            print(f"    {Path(qa['image']).name}: {qa['question']} -> {qa['answer']} | {qa['truth']}")

        t = time.perf_counter()
        report["geneval"] = geneval_step(run, args.out, args.geneval_prompts, args.seed)
        report["geneval_expanded"] = geneval_step(run, args.out, args.geneval_prompts, args.seed, expand=True)
        banner(4, f"synthetic GenEval, {args.geneval_prompts} held-out prompts x 1 image, exact detector "
                  f"({time.perf_counter() - t:.0f}s) -> {args.out / 'geneval'}")  # fmt: skip
        print("    " + format_summary(report["geneval"]).replace("\n", "\n    "))
        print(f"    with prompt expansion (the model first writes each prompt out as a scene description, then draws "
              f"it) -> {args.out / 'geneval-expanded'}")  # fmt: skip
        print("    " + format_summary(report["geneval_expanded"]).replace("\n", "\n    "))

        t = time.perf_counter()
        banner(5, f"POPE and MME on {len(rows)} held-out scenes through lmms-eval (eval/run_lmms.py) ...")
        report["lmms_eval"] = lmms_step(checkpoint_dir(args.checkpoint), heldout, args.out, args.batch_size)
        print(f"    ({time.perf_counter() - t:.0f}s) -> {args.out / 'lmms_eval'}")

        report["tokenizer"] = recon = reconstruction_step(run, heldout, rows)
        detected = ", ".join(f"{k} {v:.2f}" for k, v in recon["detector"].items())
        judge = "n/a" if recon["geneval_judge"] is None else f"{recon['geneval_judge']:.2f}"
        banner(6, f"tokenizer encode -> decode on {len(rows)} held-out images: PSNR {recon['psnr']:.2f} dB; exact "
                  f"detector on the reconstructions: {detected}; GenEval judge on them: {judge}")  # fmt: skip


if __name__ == "__main__":
    main()
