"""How many fold×backbone trials one card holds, and what packing them buys: measured, not estimated.

On a machine with one GPU (no model hub needed):

    python benchmarks/gpu_packing.py                              # both models, k = 1 2 4 8, 24 GB budget, via Ray
    python benchmarks/gpu_packing.py --ks 1 2 4 --budget-gb 24 --steps 60 --data-dir ../shared/data/nikl_ea_2023
    python benchmarks/gpu_packing.py --no-ray                     # the same trials as plain processes
    python benchmarks/gpu_packing.py --device cpu --models tiny --ks 1 2 --steps 10   # the plumbing, on a CPU

It builds random-init checkpoints of two real shapes from `nikl_ray/examples/model_shapes/`
(KLUE-RoBERTa-base in full fine-tuning at batch 32 × 128; polyglot-ko-1.3b, a GPT-NeoX, in
QLoRA r=64 at 8 × 128), each with a tokenizer trained on the task's text up to its vocabulary
size. Then, for each k, it runs k trials of the project's own training worker (`worker.train_fold`,
one epoch of `--steps` steps) at once on the card, each with share 1/k and the allocator cap the
plan gives a `--budget-gb` card, and samples `nvidia-smi` every half second. Per (model, k):
peak memory per process as NVML sees it (context included) against the plan's estimate, torch's
peak allocated, OOMs, steps/s per trial, samples/s for the card, and GPU busy %. Writes
gpu_packing.json / .md under `--out`. CPU tests do not use it.

A machine with torch, transformers and peft but without Ray, bitsandbytes or Optuna needs them
carried: `bash ../shared/tools/gpu_bundle.sh .gpu` packs them into one file (see its header).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = REPO / "nikl_ray" / "examples" / "model_shapes"
MODELS = {  # name → (shape or tiny kind, backbone fields)
    "klue-roberta-base": ("klue-roberta-base", {"mode": "full", "batch_size": 32, "max_length": 128, "lr": 3e-5}),
    "polyglot-ko-1.3b": ("polyglot-ko-1.3b", {"mode": "qlora", "lora_r": 64, "batch_size": 8, "max_length": 128, "lr": 2e-4}),
    "tiny": ("tiny:gpt_neox", {"mode": "lora", "batch_size": 8, "max_length": 64, "lr": 5e-3}),
}


def build(name: str, texts: list[str], out: Path) -> str:
    from nikl_ray.tiny import make_random_init, make_tiny_backbone

    shape = MODELS[name][0]
    target = out / "checkpoints" / name
    if not (target / "config.json").exists():
        t0 = time.time()
        if shape.startswith("tiny:"):
            make_tiny_backbone(shape.removeprefix("tiny:"), texts, target)
        else:
            make_random_init(SHAPES / shape, texts, target)
        print(f"built {name} in {target} ({time.time() - t0:.0f} s)", flush=True)
    return str(target)


class Sampler(threading.Thread):
    """nvidia-smi every half second: memory per process and on the whole card (MiB), GPU busy %."""

    def __init__(self):
        super().__init__(daemon=True)
        self.memory: dict[int, float] = {}
        self.busy: list[float] = []
        self.card_peak = 0.0  # MiB used on the card, all processes
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True).stdout
            for line in apps.strip().splitlines():
                pid, mib = (x.strip() for x in line.split(","))
                self.memory[int(pid)] = max(self.memory.get(int(pid), 0.0), float(mib))
            card = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True).stdout.strip().splitlines()
            if card:  # the card's total too: in a container NVML may report pids of another namespace
                busy, used = (float(x) for x in card[0].split(","))
                self.busy.append(busy)
                self.card_peak = max(self.card_peak, used)
            time.sleep(0.5)


def trials(name: str, k: int, args) -> tuple[list, float]:
    """The k FoldRuns of one measurement (the same in the parent and in `--no-ray`'s processes), and
    the plan's estimate per trial (GB, context included)."""
    import numpy as np

    from nikl_ray.backbones import BackboneSpec
    from nikl_ray.data import read_rows
    from nikl_ray.placement import CONTEXT_GB, GiB, Placement, estimate_for
    from nikl_ray.runspec import Device, FoldRun, RowsPayload
    from nikl_ray.tasks import get_task

    task = get_task("nikl-emotion")
    data_dir = Path(args.data_dir)
    source = data_dir / "train.jsonl" if (data_dir / "train.jsonl").exists() else REPO / "nikl_ray" / "demo_data" / "train.jsonl"
    rows = read_rows(source, task)
    out = Path(args.out)
    cuda = args.device == "cuda"
    physical = None
    if cuda:
        import torch

        physical = torch.cuda.get_device_properties(0).total_memory / GiB
    device = Device(cuda, args.device, cuda and __import__("torch").cuda.is_bf16_supported())
    spec = BackboneSpec(name=name, checkpoint=build(name, rows.texts[:20000], out), epochs=1, **MODELS[name][1])
    estimate = estimate_for(spec, device) / GiB
    cap = (args.budget_gb / k - CONTEXT_GB) / physical if cuda else None
    placement = Placement(name, estimate, k, 1.0 / k if cuda else 0.0, 1.0, cap if cap and cap > 0 else None)
    train_idx = np.resize(np.arange(len(rows)), args.steps * spec.batch_size)  # one epoch = --steps steps
    runs = [FoldRun(spec, task, 0, f"{name}-k{k}-{'plain' if args.no_ray else 'ray'}-{i}", str(out / "runs"),
                    RowsPayload(rows.ids, rows.inputs(), rows.labels), train_idx, np.array([], dtype=int), np.arange(8),
                    device.device, device.precision(spec), device.gradient_checkpointing(spec), placement, 0,
                    predict_heldout=False) for i in range(k)]
    return runs, estimate + CONTEXT_GB, cap * physical if cap else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["klue-roberta-base", "polyglot-ko-1.3b"], choices=list(MODELS))
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8], help="trials at once on the card")
    ap.add_argument("--budget-gb", type=float, default=24.0, help="the card budget the caps are computed for")
    ap.add_argument("--steps", type=int, default=60, help="training steps per trial (one epoch)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "nikl_ea_2023"))
    ap.add_argument("--no-ray", action="store_true", help="plain processes instead of Ray Train runs")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check the plumbing without a GPU")
    ap.add_argument("--out", default=str(REPO / "results" / "gpu_packing"))
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "K", "I"), help=argparse.SUPPRESS)  # --no-ray's child process
    args = ap.parse_args(argv)
    if args.one:  # one trial in a process of its own: the same worker function, without Ray Train
        from nikl_ray.worker import train_fold

        name, k, i = args.one
        train_fold({"run": trials(name, int(k), args)[0][int(i)]})
        return 0

    from nikl_ray.tables import markdown

    out = Path(args.out)
    cuda = args.device == "cuda"
    import shutil

    shutil.rmtree(out / "runs", ignore_errors=True)  # Ray Train would resume runs of the same names
    if not args.no_ray:
        import ray

        from nikl_ray.cluster import connect
        from nikl_ray.launcher import fit_run

        connect(local=True, num_gpus=1 if cuda else 0)
    table = []
    for name in args.models:
        for k in args.ks:
            runs, estimate, cap = trials(name, k, args)
            sampler = Sampler() if cuda else None
            if sampler:
                sampler.start()
            t0, errors = time.time(), []
            if args.no_ray:
                child = [sys.executable, __file__, *sys.argv[1:]] if argv is None else [sys.executable, __file__, *argv]
                procs = [subprocess.Popen([*child, "--one", name, str(k), str(i)]) for i in range(k)]
                errors = [f"exit code {code}" for code in (p.wait() for p in procs) if code]
            else:
                refs = [ray.remote(num_cpus=0, num_gpus=0)(fit_run).remote(run) for run in runs]
                for ref in refs:
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - an out-of-memory is a result here
                        # the cause (the worker's out-of-memory message, else the last line), not Ray's task header
                        lines = [line for line in str(e).splitlines() if line.strip()] or [repr(e)]
                        errors.append(next((line for line in lines if "ran out of memory" in line), lines[-1])[:200])
            wall = time.time() - t0
            if sampler:
                sampler.stop.set()
                sampler.join()
            finals = [json.loads(p.read_text()) for p in (out / "runs" / r.name / "final.json" for r in runs) if p.exists()]
            nvml = [mib / 1024 for pid, mib in (sampler.memory.items() if sampler else []) if pid in {f["pid"] for f in finals}]
            table.append({
                "model": name, "mode": "plain processes" if args.no_ray else "Ray Train", "k": k,
                "estimate per trial (GB)": estimate, "allocator cap (GB)": cap,
                "NVML peak per process (GB)": max(nvml) if nvml else None,
                "NVML card peak, all trials (GB)": sampler.card_peak / 1024 if sampler else None,
                "torch peak allocated (GB)": max((f["peak_gpu_gb"] or 0 for f in finals), default=None),
                "OOMs / failures": len(errors),
                "steps/s per trial": statistics.mean(f["train_steps_per_second"] for f in finals) if finals else None,
                "samples/s per card": sum(f["train_samples_per_second"] for f in finals) if finals else None,
                "GPU busy %": statistics.mean(sampler.busy) if sampler and sampler.busy else None,
                "wall (s)": wall, "errors": "; ".join(errors)[:300]})
            print(markdown([table[-1]]), flush=True)
            text = write_table(table, out, args)  # after every row: a run cut short keeps what it measured
    print(text)
    return 0


def write_table(table: list[dict], out: Path, args) -> str:
    from nikl_ray.artifacts import write_json, write_text
    from nikl_ray.tables import markdown

    write_json(out / f"gpu_packing{'_plain' if args.no_ray else ''}.json", table)
    text = (f"# Trials per card, measured ({'plain processes' if args.no_ray else 'Ray Train'}, budget {args.budget_gb:g} GB, "
            f"{args.steps} steps per trial)\n\n" + markdown(table))
    write_text(out / f"gpu_packing{'_plain' if args.no_ray else ''}.md", text)
    return text


if __name__ == "__main__":
    sys.exit(main())
