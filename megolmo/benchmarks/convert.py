"""Time and peak memory of checkpoint conversion and soups on a full-size random OLMo 2 model.

    python tools/bench_convert.py [--model olmo2_1b] [--dir /tmp] [--keep] [--no-peer]   (the CLI)

Builds a random Hugging Face ``Olmo2ForCausalLM`` directory (bf16 safetensors, written tensor by tensor),
then runs each conversion as a fresh ``tools/...`` subprocess and reads that process's own peak resident
memory (``os.wait4``). Next to each it prints the largest tensor and the model size, and the baseline RSS
of a Python process that merely imports the converter, so "peak - baseline" is what the conversion itself
holds. The peer rows do the same job the obvious way (whole state dict in memory: safetensors
``load_file``/``save_file`` and one ``dcp.save``/``dcp.load``), measured in the same run, where memory allows.
Everything it writes is deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megolmo.checkpoint.hf import write_hf
from megolmo.checkpoint.reader import TensorSource, expected_tensors
from megolmo.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]

GB = 1e9
HF_TO_MEGOLMO, MEGOLMO_TO_HF_BF16 = "hf-to-megolmo (bf16 -> fp32 DCP)", "megolmo-to-hf --dtype bf16"
PEER_LOAD, PEER_SAVE = "peer: load_file + dcp.save (whole model)", "peer: dcp.load + save_file bf16 (whole model)"

PEER_HF_TO_DCP = """
import sys, warnings, torch, torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
warnings.simplefilter("ignore")
state = {"model/" + k: v.float() for k, v in load_file(sys.argv[1] + "/model.safetensors").items()}
dcp.save(state, storage_writer=dcp.FileSystemWriter(sys.argv[2]), no_dist=True)
"""
PEER_DCP_TO_HF = """
import sys, warnings, torch, torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
warnings.simplefilter("ignore")
meta = dcp.FileSystemReader(sys.argv[1]).read_metadata().state_dict_metadata
state = {k: torch.empty(m.size) for k, m in meta.items() if k.startswith("model/")}
dcp.load(state, checkpoint_id=sys.argv[1], no_dist=True)
import os; os.makedirs(sys.argv[2])
save_file({k[6:]: v.to(torch.bfloat16) for k, v in state.items()}, sys.argv[2] + "/model.safetensors",
          metadata={"format": "pt"})
"""


class RandomModel(TensorSource):
    """N(0, 0.02) weights (norms 1), generated on demand; never held whole."""

    kind = "random"

    def __init__(self, cfg: ModelConfig):
        self.config, self.path, self.shapes = cfg, Path("random"), expected_tensors(cfg)

    def read(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(0.0, 0.02)


# Linux folds the pre-exec memory of a child (a copy of its parent) into its ru_maxrss, so the measured
# command is started by this small interpreter (no torch, ~10 MB), never directly by the benchmark.
SPAWNER = """
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (bytes) of one fresh subprocess."""
    with tempfile.NamedTemporaryFile("r", suffix=".rusage") as result:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", SPAWNER, result.name, *cmd], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        code, maxrss_kib = (int(x) for x in (result.read().split() or ["1", "0"]))
    if proc.returncode or code:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, maxrss_kib * 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="olmo2_1b", help="named model config (conf/model/*.yaml)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (needs ~4.5x bf16 model size)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--no-peer", action="store_true", help="skip the whole-model-in-memory peer")
    args = parser.parse_args()

    cfg = ModelConfig.named(args.model)
    shapes = expected_tensors(cfg)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    largest_name, largest = max(shapes.items(), key=lambda kv: torch.Size(kv[1]).numel())
    fp32, bf16, largest_fp32 = 4 * params, 2 * params, 4 * torch.Size(largest).numel()
    need = 2 * bf16 + 2 * fp32 + (fp32 + bf16 if not args.no_peer else 0)
    free = shutil.disk_usage(args.dir).free
    if free < 1.1 * need:
        raise SystemExit(f"{args.dir}: {free / GB:.1f} GB free, the benchmark needs about {need / GB:.1f} GB")
    work = Path(tempfile.mkdtemp(prefix="megolmo-bench-convert-", dir=args.dir))
    py, tool = sys.executable, str(ROOT / "tools")
    print(f"model {args.model}: {params / 1e9:.3f}B parameters, {len(shapes)} tensors, fp32 {fp32 / GB:.2f} GB, "
          f"bf16 {bf16 / GB:.2f} GB; largest tensor {largest_name} {list(largest)} = {largest_fp32 / GB:.3f} GB fp32")
    print(f"work dir {work} ({free / GB:.0f} GB free), {os.cpu_count()} CPUs, torch {torch.__version__}")
    rows = []
    try:
        started = time.perf_counter()
        write_hf(RandomModel(cfg), work / "hf", torch.bfloat16)
        print(f"built the random bf16 HF checkpoint in {time.perf_counter() - started:.1f}s")
        startup, baseline = measure([py, "-c", "import megolmo.checkpoint.soup"])

        def run(label: str, cmd: list[str], out: Path, delete: bool = True) -> None:
            seconds, rss = measure(cmd)
            size = dir_bytes(out)
            rows.append((label, seconds, size / GB / seconds, rss))
            print(f"  {label}: {seconds:.1f}s, {rss / GB:.2f} GB peak RSS", flush=True)
            if delete:
                shutil.rmtree(out)

        run(HF_TO_MEGOLMO,
            [py, f"{tool}/convert_checkpoint.py", "hf-to-megolmo", str(work / "hf"), str(work / "ckpt")],
            work / "ckpt", delete=False)
        run(MEGOLMO_TO_HF_BF16,
            [py, f"{tool}/convert_checkpoint.py", "megolmo-to-hf", str(work / "ckpt"), str(work / "out"), "--dtype",
             "bf16"], work / "out")
        run("megolmo-to-hf --dtype fp32",
            [py, f"{tool}/convert_checkpoint.py", "megolmo-to-hf", str(work / "ckpt"), str(work / "out")], work / "out")
        run("soup hf + megolmo -> megolmo",
            [py, f"{tool}/soup.py", "--output", str(work / "out"), str(work / "hf"), str(work / "ckpt")], work / "out")
        if args.no_peer:
            pass
        elif mem_available() < 1.3 * (fp32 + bf16):
            print(f"  peer skipped: {mem_available() / GB:.1f} GB available, it needs about {(fp32 + bf16) / GB:.1f} GB")
        else:
            run(PEER_LOAD,
                [py, "-c", PEER_HF_TO_DCP, str(work / "hf"), str(work / "out")], work / "out")
            run(PEER_SAVE,
                [py, "-c", PEER_DCP_TO_HF, str(work / "ckpt"), str(work / "out")], work / "out")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"baseline RSS (python + import megolmo.checkpoint): {baseline / GB:.2f} GB; largest tensor "
          f"{largest_fp32 / GB:.3f} GB fp32; model {fp32 / GB:.2f} GB fp32 / {bf16 / GB:.2f} GB bf16")
    print(f"seconds are wall time of the whole subprocess, including {startup:.1f}s of interpreter start and imports; "
          "GB/s = bytes written / seconds (all writes fsync'd)")
    header = f"{'conversion':<46} {'seconds':>8} {'GB/s':>6} {'peak RSS GB':>11} {'minus base':>10} {'x largest':>9}"
    print(header)
    print("-" * len(header))
    for label, seconds, rate, rss in rows:
        print(f"{label:<46} {seconds:>8.1f} {rate:>6.2f} {rss / GB:>11.2f} {(rss - baseline) / GB:>10.2f} "
              f"{(rss - baseline) / largest_fp32:>9.2f}")
    by_label = {row[0]: row for row in rows}
    for ours, peer in ((HF_TO_MEGOLMO, PEER_LOAD), (MEGOLMO_TO_HF_BF16, PEER_SAVE)):
        if ours in by_label and peer in by_label:
            (_, s_ours, _, m_ours), (_, s_peer, _, m_peer) = by_label[ours], by_label[peer]
            print(f"{ours} vs its peer: {s_ours / s_peer:.2f}x the time, {(m_ours - baseline) / (m_peer - baseline):.2f}x "
                  "the memory above baseline")
    return 0

