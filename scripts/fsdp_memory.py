"""Memory per process of 2-process training.distill runs, plain data parallelism against FSDP2, on CPU
(gloo): the numbers of docs/multi_gpu.md ("Several GPUs: DDP or FSDP2").

    .venv/bin/python scripts/fsdp_memory.py --unet mid    # benchmarks.speed.MID_UNET_CONFIG, 6.6 M parameters
    .venv/bin/python scripts/fsdp_memory.py --unet sd15   # the SD1.5 UNet architecture, 860 M, 8x8 latents

Each run is ``accelerate launch`` of this file in worker mode, which runs ``training.distill.main`` and
reads each process's /proc/self/status: the resident size once the run is set up (teacher loaded,
adapters on, sharded), the high-water mark up to then (loading: every process reads the whole teacher
before ``fully_shard`` keeps its shard), the high-water mark of the training steps after it, and the
bytes of base-network parameters the process holds (its shards under FSDP2).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_ENV = "TDM_FSDP_MEMORY_OUT"  # the folder each worker process writes its rank-N.json into
LAUNCH = {
    "ddp": ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    "fsdp2": ["--config_file", str(ROOT / "training" / "configs" / "accelerate_fsdp2.yaml")],
}


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(argv: list[str]) -> int:
    import torch

    sys.path.insert(0, str(ROOT))
    import training.distill as distill

    record: dict = {}
    start_run = distill.start_run

    def measured_start_run(cfg, accelerator):
        out = start_run(cfg, accelerator)
        gc.collect()
        network = out[0].family.network
        local = [getattr(p, "_local_tensor", p) for p in network.parameters()]
        record.update(rank=accelerator.process_index, rss_setup_mb=status_mb("VmRSS"), peak_setup_mb=status_mb("VmHWM"),
                      base_params_mb=sum(t.numel() * t.element_size() for t, p in zip(local, network.parameters()) if not p.requires_grad) / 2**20)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the training steps' own peak from here
        return out

    distill.start_run = measured_start_run
    torch.set_num_threads(1)
    code = distill.main(argv)
    record["peak_train_mb"] = status_mb("VmHWM")
    (Path(os.environ[OUT_ENV]) / f"rank-{record['rank']}.json").write_text(json.dumps(record))
    return code


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(mode: str, model: Path, prompts: Path, work: Path, steps: int, batch_size: int) -> list[dict]:
    argv = ["--model", str(model), "--prompts", str(prompts), "--output", str(work / mode / "tdm.safetensors"),
            "--num-steps", "2", "--max-train-steps", str(steps), "--batch-size", str(batch_size), "--lora-rank", "16",
            "--checkpoint-every", "0", "--validate-every", "0", "--probe-every", "0"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH[mode], "--num_processes", "2",
               "--main_process_port", str(free_port()), str(Path(__file__).resolve()), "--worker", *argv]
    out = work / mode / "memory"
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", OUT_ENV: str(out)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{(proc.stdout + proc.stderr)[-5000:]}")
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]


def main() -> int:
    if "--worker" in sys.argv:
        return worker(sys.argv[sys.argv.index("--worker") + 1 :])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", choices=("mid", "sd15"), default="mid")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.speed import MID_UNET_CONFIG, prompts_file, unet_config, write_model_folder_in_subprocess

    config = MID_UNET_CONFIG if args.unet == "mid" else unet_config("sd15", sample_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_model_folder_in_subprocess(work / "teacher", unet_config=config)
        prompts = prompts_file(work)
        print(f"| {args.unet} UNet, 2 CPU processes (gloo) | process | resident after set-up | peak while loading | peak of the steps | base weights held |")
        print("|---|---|---|---|---|---|")
        for mode in ("ddp", "fsdp2"):
            for row in measure(mode, model, prompts, work, args.steps, args.batch_size):
                print(f"| {mode} | {row['rank']} | {row['rss_setup_mb']:.0f} MiB | {row['peak_setup_mb']:.0f} MiB | "
                      f"{row['peak_train_mb']:.0f} MiB | {row['base_params_mb']:.0f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
