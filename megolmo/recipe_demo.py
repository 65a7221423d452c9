"""OLMo 2's recipe in miniature, through the same commands a user runs (``make recipe-demo``):

stage 1 on a toy corpus -> three stage-2 ingredients (other data, three seeds, stage 1's moments and LR) ->
their soup, evaluated beside them -> SFT of the soup on ``data/demo_chat.jsonl`` -> export to Hugging Face
with OLMo 2's tokenizer and chat template -> a chat reply from transformers' ``generate``.

The tiny model keeps OLMo 2's dolma2 vocabulary (100,352 rows) so the real tokenizer and chat template serve
every stage. With ``--ranks 8`` (the default) every training job runs TP2 x PP2 x DP2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megolmo.benchmarks.launch import free_port, run_logged
from megolmo.data.demo_corpus import generate_documents
from megolmo.evaluation.assets import dolma2_tokenizer
from megolmo.stage2_soup import table

ROOT = Path(__file__).resolve().parents[1]
CHAT_SET = ROOT / "data" / "demo_chat.jsonl"
MODEL = ["model=tiny", "model.vocab_size=100352", "model.eos_token_id=100257", "model.pad_token_id=100277"]
DOCUMENTS = {"stage1": 3000, "stage2": 1500, "held-out": 300}
LAYOUTS = {1: [], 8: ["parallel=demo3d"]}
QUESTION = "What is the capital of France?"


def shape(batch: int) -> list[str]:
    """Every job's sequences and batch: ``batch`` sequences of 64 tokens per step."""
    return ["data.seq_len=64", f"trainer.global_batch_size={batch}", "trainer.micro_batch_size=2"]


def train(ranks: int, batch: int, overrides: list[str], log: Path) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                 str(free_port())] if ranks > 1 else [sys.executable])
    run_logged([*launcher, "-m", "megolmo.train", *MODEL, *shape(batch), *LAYOUTS[ranks], "trainer.plots=false",
                "trainer.log_interval=10", *overrides], log)


def corpus(out: Path, name: str, documents: int, seed: int, tokenizer: Path) -> Path:
    """Toy documents tokenized with the dolma2 tokenizer by ``tools/prepare_data.py``."""
    directory = out / "data" / name
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "docs.jsonl", "w") as f:
        for text in generate_documents(documents, seed):
            f.write(json.dumps({"text": text}) + "\n")
    run_logged([sys.executable, "tools/prepare_data.py", "--tokenizer", str(tokenizer), "--output", str(directory),
                "--workers", "1", str(directory / "docs.jsonl")], out / f"prepare-{name}.log")
    return directory / "tokens.npy"


def chat(hf_dir: Path) -> tuple[str, int]:
    """The model card's snippet: the chat template, then ``generate``; the reply and its new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    new = output[0, prompt["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "recipe-demo")
    parser.add_argument("--ranks", type=int, choices=sorted(LAYOUTS), default=8)
    parser.add_argument("--steps", type=int, nargs=3, default=[75, 15, 25], metavar=("STAGE1", "STAGE2", "SFT"))
    parser.add_argument("--documents", type=float, default=1.0, help="scale the toy corpora (tests: 0.05)")
    parser.add_argument("--batch", type=int, default=16, help="sequences of 64 tokens per step (tests: 4)")
    args = parser.parse_args(argv)
    started, out = time.perf_counter(), args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = dolma2_tokenizer()
    stage1_data, stage2_data, held = (corpus(out, name, int(count * args.documents), seed, tokenizer)
                                      for seed, (name, count) in enumerate(DOCUMENTS.items()))
    stage1, (s1, s2, s3) = out / "stage1", args.steps
    evaluation = [f"eval.lm.sets={{held: [{held}]}}"]
    train(args.ranks, args.batch, [f"data.paths=[{stage1_data}]", f"trainer.max_steps={s1}", "optim.lr=3e-3",
                                   f"optim.warmup_steps={min(10, s1 // 4)}", f"trainer.run_dir={stage1}", *evaluation],
          out / "stage1.log")
    ingredients = []
    for k in (1, 2, 3):
        ingredients.append(out / f"stage2-ingredient{k}")
        train(args.ranks, args.batch, [
            f"load_path={stage1}", "reset_trainer_state=true", "optim.lr_from_load_path=true", "optim.schedule=linear",
            "optim.warmup_steps=0", f"data.paths=[{stage2_data}]", f"data.seed={k}", f"trainer.max_steps={s2}",
            "trainer.stage=2", f"trainer.ingredient={k}", f"trainer.run_dir={ingredients[-1]}"],
            out / f"stage2-ingredient{k}.log")
    run_logged([sys.executable, "tools/stage2_soup.py", *map(str, ingredients), "--output", str(out / "soup"),
                "--lm-sets", f"held={held}", "--tokenizer", str(tokenizer), "--", *shape(args.batch)],
               out / "soup.log")
    soup = next(p for p in (out / "soup").iterdir() if p.name.startswith("stage2-soup") and not p.name.endswith("-hf"))
    sft_data = out / "data" / "sft"
    run_logged([sys.executable, "tools/prepare_sft.py", "--tokenizer", str(tokenizer), "--output", str(sft_data),
                "--seq-len", "64", str(CHAT_SET)], out / "prepare-sft.log")
    train(args.ranks, args.batch, [
        f"load_path={soup}", "reset_trainer_state=true", "reset_optimizer_state=true",
        f"data.paths=[{sft_data / 'input_ids.npy'}]", f"data.label_mask_paths=[{sft_data / 'label_mask.npy'}]",
        "optim.lr=1e-3", "optim.schedule=linear", f"optim.warmup_steps={min(4, s3 // 4)}", f"trainer.max_steps={s3}",
        f"trainer.run_dir={out / 'sft'}"], out / "sft.log")
    hf_dir = out / "sft-hf"
    sft_checkpoint = out / "sft" / "checkpoints" / "latest"
    run_logged([sys.executable, "tools/convert_checkpoint.py", "megolmo-to-hf", str(sft_checkpoint), str(hf_dir),
                "--tokenizer", str(tokenizer), "--chat-template", "olmo2"], out / "export.log")
    reply, new_tokens = chat(hf_dir)
    print(table(json.loads((out / "soup" / "evaluation.json").read_text())))
    print(f"user: {QUESTION}\nassistant ({hf_dir}, {new_tokens} new tokens): {reply}")
    print(f"recipe demo: {time.perf_counter() - started:.0f} s, {args.ranks} rank(s) per job; outputs in {out}")
    return 0
