"""SAE training throughput: the Ray Train trainer vs a plain PyTorch loop with the same math.

    python benchmarks/bench_train_sae.py                # CPU: d=768, m=24,576, batch 4,096 (issue 3)
    python benchmarks/bench_train_sae.py --steps 4 --d 256 --expansion 8 --batch 1024   # quick
    python benchmarks/bench_train_sae.py --gpu          # CUDA, no Ray: bf16 steps at batch 16,384

CPU mode, both measured in this run on the same random activations:
- plain: one process, activations in memory (run before and after ours; their mean), ``SparseAutoencoder.loss`` → backward → parallel-
  gradient removal → Adam → renormalise, on random batches: what the paper's code does.
- ours: ``python -m pipeline.train_sae`` on the same activations written as .npy — Ray Data reads
  them, the Ray Train worker iterates its shard with the local shuffle buffer. Its steady-state
  rate comes from the metrics' ``elapsed_s`` (steps and data waits, not the start-up), and the
  end-to-end rate including Ray and Ray Train start-up is printed beside it.
Target: ours ≥ 0.9× plain (steady state).

GPU mode (no Ray, no data loading: the step itself) — the trainer's SAETraining.train_step in
bf16 autocast vs fp32, and what the rate implies for the paper's 100M patches."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop(x: torch.Tensor, d: int, m: int, batch: int, steps: int, alpha: float = 4e-4) -> float:
    """patches/s of the plain loop over ``steps`` steps after one warm-up step."""
    from pipeline.sae import SAESpec, SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec(d=d, m=m))
    with torch.no_grad():
        sae.b_dec.copy_(x[:65536].mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step():
        xb = x[torch.randint(len(x), (batch,), generator=gen)]
        out = sae.loss(xb, alpha)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def ray_train_run(x: np.ndarray, d: int, expansion: int, batch: int, steps: int, threads: int) -> tuple[float, float]:
    """(steady-state patches/s, end-to-end patches/s) of ``python -m pipeline.train_sae``."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "acts.npy", x)
        config = {"source": {"format": "activations", "root": str(Path(tmp) / "acts.npy")},
                  "sae": {"expansion": expansion},
                  "train": {"batch_size": batch, "steps": steps + 1, "log_every": steps + 1, "checkpoint_every": steps + 1,
                            "shuffle_buffer": 2 * batch, "init_patches": batch, "threads": threads},
                  "ray": {"num_cpus": os.cpu_count()}, "output": str(Path(tmp) / "sae")}
        (Path(tmp) / "train.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.train_sae", "--config", str(Path(tmp) / "train.yaml")],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        rows = [json.loads(r) for r in (Path(tmp) / "sae" / "metrics.jsonl").read_text().splitlines()]
    # steady state: from the end of the first (warm-up) step to the end of the last (the two rows logged)
    steady = (rows[-1]["patches"] - rows[0]["patches"]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])
    return steady, rows[-1]["patches"] / wall


def bench_cpu(args) -> None:
    d, m = args.d, args.d * args.expansion
    threads = torch.get_num_threads()
    n = max(4 * args.batch, 65536)
    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    print(f"CPU, {threads} torch threads: d={d}, m={m}, batch {args.batch}, {args.steps} timed steps each")
    # The plain loop runs before and after the Ray Train run and counts as their mean: on a small
    # shared machine the rate drifts by ±15% from minute to minute.
    before = plain_loop(torch.from_numpy(x), d, m, args.batch, args.steps)
    steady, end_to_end = ray_train_run(x, d, args.expansion, args.batch, args.steps, threads)
    after = plain_loop(torch.from_numpy(x), d, m, args.batch, args.steps)
    plain = (before + after) / 2
    print(f"{'':28}{'patches/s':>12}{'vs plain':>10}")
    print(f"{'plain PyTorch loop (mean)':28}{plain:12.0f}{1.0:10.2f}   (before {before:.0f}, after {after:.0f})")
    print(f"{'Ray Train (steady state)':28}{steady:12.0f}{steady / plain:10.2f}")
    print(f"{'Ray Train (with start-up)':28}{end_to_end:12.0f}{end_to_end / plain:10.2f}")
    ratio = steady / plain
    print(f"RESULT train_sae_cpu: ratio={ratio:.2f} (target >= 0.9) {'PASS' if ratio >= 0.9 else 'FAIL'}")


def bench_gpu(args) -> None:
    from pipeline.config import SAETrainSpec, TrainLoop
    from pipeline.sae_training import SAETraining

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    d, batch = args.d, args.batch
    x = torch.randn(batch * 8, d, device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test)"
    print(f"{name}: d={d}, m={d * args.expansion}, batch {batch}")
    for dtype in ("bfloat16", "float32"):
        loop = TrainLoop(batch_size=batch, steps=10**6, log_every=10**6, dtype=dtype)
        run = SAETraining(SAETrainSpec(expansion=args.expansion), loop, d, device)
        run.initialise(x[:65536])
        for i in range(3):
            run.train_step(x[i * batch:(i + 1) * batch])
        sync()
        start = time.perf_counter()
        for i in range(args.steps):
            run.train_step(x[(i % 8) * batch:(i % 8 + 1) * batch])
        sync()
        rate = args.steps * batch / (time.perf_counter() - start)
        hours = 100e6 / rate / 3600
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"RESULT train_sae_gpu {dtype}: {rate:,.0f} patches/s, {batch / rate * 1e3:.1f} ms/step; "
              f"100M patches in {hours * 60:.1f} min on one GPU; peak memory {peak:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--device", default="cuda", help="--gpu only: cpu for a smoke test of the script")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--batch", type=int, default=None, help="default 4,096 on CPU, 16,384 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 6 on CPU, 50 on GPU)")
    args = parser.parse_args()
    args.batch = args.batch or (16384 if args.gpu else 4096)
    args.steps = args.steps or (50 if args.gpu else 6)
    bench_gpu(args) if args.gpu else bench_cpu(args)


if __name__ == "__main__":
    main()
