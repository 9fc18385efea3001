"""The SAE training recipe without Ray: the learning-rate warm-up, one optimisation step
(:class:`SAETraining`, which every Ray Train worker of :mod:`pipeline.train_sae` runs) and the
in-memory :func:`train` for tests and quick experiments. Kept apart from the driver so that a
machine with torch and no Ray (a lent GPU: benchmarks/device_check.py) runs the real step."""

from __future__ import annotations

import json
import time

import torch

from pipeline.config import SAETrainSpec, TrainLoop
from pipeline.sae import SAESpec, SparseAutoencoder


def lr_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


class SAETraining:
    """The recipe's state and one optimisation step. The same object runs in every Ray Train
    worker and in the in-memory :func:`train`. With N workers, gradients and firing counts are
    summed over the workers by one all-reduce each, so N workers at batch B/N take the step one
    worker takes at batch B."""

    def __init__(self, spec: SAETrainSpec, loop: TrainLoop, d: int, device: torch.device | str = "cpu",
                 world_size: int = 1):
        self.spec, self.loop, self.d = spec, loop, d
        self.device, self.world_size = torch.device(device), world_size
        torch.manual_seed(loop.seed)  # identical initial weights on every worker
        self.sae = SparseAutoencoder(SAESpec(d=d, m=spec.expansion * d, kind=spec.kind, k=spec.k)).to(self.device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=loop.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, loop.warmup_steps))
        self.since_fired = torch.zeros(self.sae.spec.m, dtype=torch.long, device=self.device)
        self.step = 0
        self.patches_seen = 0
        self.skipped_nonfinite = 0
        self.variance = 1.0  # of the data the SAE sees (scaled), summed over dimensions
        self.history: list[dict] = []  # the metrics rows, kept with the state so a resume continues them
        self.elapsed_s = 0.0  # wall time of the steps and the data waits between them (not start-up)
        self._last_step_end: float | None = None
        use_bf16 = loop.dtype == "bfloat16" or (loop.dtype == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor) -> None:
        """b_dec = the sample mean, the activation scale and the data variance, from the first
        patches of every worker together."""
        sample = sample.to(self.device, torch.float32)
        sample = sample[torch.isfinite(sample).all(dim=1)].double()
        count = torch.tensor([len(sample)], dtype=torch.float64, device=self.device)
        sums = self.all_reduce(torch.cat([sample.sum(0), sample.pow(2).sum(0), sample.norm(dim=1).sum().view(1), count]))
        n = sums[-1].item()
        if not n:
            raise ValueError("train: no finite activations to train on")
        mean, mean_sq, mean_norm = sums[:self.d] / n, sums[self.d:2 * self.d] / n, sums[-2].item() / n
        scale = 1.0 if self.spec.scale == "none" else 1.0 / mean_norm
        self.sae.spec.input_scale = scale
        self.sae.b_dec.copy_((mean * scale).float())  # the reference code meant to do this but never did
        self.variance = ((mean_sq - mean.pow(2)).sum() * scale**2).item()

    def alpha(self) -> float:
        warm = self.loop.l1_warmup_steps
        return self.spec.alpha * (min(1.0, (self.step + 1) / warm) if warm else 1.0)

    def train_step(self, x: torch.Tensor) -> dict | None:
        """One step on this worker's batch [b, d]; returns the metrics row on logging steps."""
        begin = self._last_step_end or time.perf_counter()  # include the wait for this batch
        row = self._train_step(x)
        self._last_step_end = time.perf_counter()
        self.elapsed_s += self._last_step_end - begin
        if row:
            row["elapsed_s"] = round(self.elapsed_s, 3)
        return row

    def _train_step(self, x: torch.Tensor) -> dict | None:
        if x.shape[-1] != self.d:
            raise ValueError(f"train: an activation batch has shape {tuple(x.shape)} but the SAE's d is {self.d}")
        x = x.to(self.device, torch.float32, non_blocking=True)
        finite = torch.isfinite(x).all(dim=1)
        n_bad = len(x) - int(finite.sum())
        if n_bad:  # a NaN/Inf patch is counted and skipped, never trained on
            x = x[finite]
        alpha, dead = self.alpha(), self.since_fired >= self.loop.dead_after_patches
        self.opt.zero_grad(set_to_none=False)
        out = None
        if len(x):
            with self.autocast:
                out = self.sae.loss(x, alpha, dead=dead, aux_k=self.loop.aux_k, aux_alpha=self.loop.aux_alpha)
            out["loss"].backward()
        logging = self.step % self.loop.log_every == 0 or self.step == self.loop.n_steps - 1
        with torch.no_grad():
            codes = out.pop("codes") if out else None
            if codes is None:
                fired = torch.zeros_like(self.since_fired)
            elif logging:  # exact firing counts, for the dense-latent metric
                fired = (codes > 0).sum(0)
            else:  # which latents fired: codes are >= 0, so a column sum tells (~10x cheaper than counting)
                fired = (codes.sum(0) > 0).long()
            counts = self.all_reduce(torch.cat([fired, torch.tensor([len(x), n_bad], device=self.device)]))
            n_rows, self.skipped_nonfinite = int(counts[-2]), self.skipped_nonfinite + int(counts[-1])
            if n_rows == 0:  # every worker's batch was non-finite: no step
                self.step += 1
                return None
            if self.world_size > 1:  # one all-reduce for all gradients
                grads = [p.grad for p in self.sae.parameters()]
                flat = self.all_reduce(torch.cat([g.flatten() for g in grads])) / self.world_size
                for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(new)
        self.sae.remove_parallel_grad_()
        self.opt.step()
        self.sched.step()
        self.sae.normalize_decoder_()
        with torch.no_grad():
            self.since_fired += n_rows
            self.since_fired[counts[:-2] > 0] = 0
        self.step += 1
        self.patches_seen += n_rows
        if not logging:
            return None
        row = self.metrics_row(out, alpha, dead, counts[:-2].float() / n_rows)
        self.history.append(row)
        return row

    def metrics_row(self, out: dict | None, alpha: float, dead: torch.Tensor, firing_rate: torch.Tensor) -> dict:
        names = ["loss", "mse", "l1", "l0", "aux"]
        local = torch.stack([out[k].detach().float() for k in names]) if out else torch.zeros(5, device=self.device)
        mean = (self.all_reduce(local.clone()) / self.world_size).tolist()
        row = {"step": self.step - 1, "patches": self.patches_seen, "alpha": alpha, "lr": self.sched.get_last_lr()[0],
               **{k: round(v, 6) for k, v in zip(names, mean)}}
        row["nmse"] = round(row["mse"] * self.d / self.variance, 6)
        row["dead"] = round(dead.float().mean().item(), 6)
        row["dense"] = round((firing_rate > self.loop.dense_fraction).float().mean().item(), 6)
        row["skipped_nonfinite"] = self.skipped_nonfinite
        return row

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "input_scale": self.sae.spec.input_scale, "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "since_fired": self.since_fired, "step": self.step,
                "patches_seen": self.patches_seen, "skipped_nonfinite": self.skipped_nonfinite,
                "variance": self.variance, "history": self.history, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.sae.spec.input_scale = state["input_scale"]
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.since_fired.copy_(state["since_fired"])
        for key in ("step", "patches_seen", "skipped_nonfinite", "variance", "history", "elapsed_s"):
            setattr(self, key, state[key])

    def finished_sae(self) -> SparseAutoencoder:
        sae = self.sae.cpu()
        sae.spec.metadata["skipped_nonfinite_patches"] = self.skipped_nonfinite
        return sae


def train(acts: torch.Tensor, spec: SAETrainSpec, loop: TrainLoop, log=print) -> tuple[SparseAutoencoder, list[dict]]:
    """The recipe in one process on activations held in memory [N, d] (random batches drawn with
    replacement): for unit tests of the recipe and quick experiments. Returns (SAE, metrics rows)."""
    gen = torch.Generator().manual_seed(loop.seed)
    run = SAETraining(spec, loop, acts.shape[1])
    run.initialise(acts[torch.randperm(len(acts), generator=gen)[:loop.init_patches]])
    finite = torch.isfinite(acts).all(dim=1)
    if not finite.all():
        log(json.dumps({"skipped_nonfinite_patches": int((~finite).sum())}))
    for _ in range(loop.n_steps):
        row = run.train_step(acts[torch.randint(len(acts), (min(loop.batch_size, len(acts)),), generator=gen)])
        if row:
            log(json.dumps(row))
    run.skipped_nonfinite = int((~finite).sum())  # patches, not draws
    return run.finished_sae(), run.history
