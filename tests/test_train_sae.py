"""The trainer recovers a known dictionary (issue 3's first test, on the foundation's trainer)."""

import pytest
import torch

from pipeline.config import SAETrainSpec, TrainLoop
from pipeline.sae_training import train


def planted_dictionary(d=64, n_atoms=256, n=60_000, k=4, seed=0):
    """x = s·D + noise + a constant offset; D unit-norm rows, k atoms per sample with positive
    coefficients in [1, 3]."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    atoms = torch.stack([torch.randperm(n_atoms, generator=g)[:k] for _ in range(n)])
    codes = torch.zeros(n, n_atoms).scatter_(1, atoms, torch.rand(n, k, generator=g) * 2 + 1)
    offset = 3.0 * torch.randn(d, generator=g) / d**0.5
    return codes @ dictionary + 0.01 * torch.randn(n, d, generator=g) + offset, dictionary


def train_and_measure(spec: SAETrainSpec, loop: TrainLoop, code_floor: float) -> dict:
    """Train on the planted dictionary; the share of atoms matched by a decoder row at cos > 0.9,
    the median best cosine, and L0 counting codes above ``code_floor`` (inference mode)."""
    x, dictionary = planted_dictionary()
    sae, history = train(x, spec, loop, log=lambda _: None)
    best_cos = (dictionary @ sae.W_dec.T).max(dim=1).values  # each atom's closest decoder row
    sae.eval()
    with torch.no_grad():
        l0 = (sae.encode(x[:5000]) > code_floor).float().sum(1).mean().item()
    figures = {"recovered": (best_cos > 0.9).float().mean().item(), "median_cos": best_cos.median().item(),
               "l0": l0, "nmse": history[-1]["nmse"], "dead": history[-1]["dead"]}
    print(f"\n{spec.kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    return figures


def test_relu_sae_recovers_a_planted_dictionary():
    loop = TrainLoop(batch_size=1024, steps=3000, lr=3e-3, warmup_steps=100, l1_warmup_steps=200, log_every=1000)
    figures = train_and_measure(SAETrainSpec(expansion=4, alpha=1e-2), loop, code_floor=0.1)
    # Measured here: 0.973 recovered, median cos 0.997, L0 6.5 — the L1 penalty keeps a few
    # small extra codes, so L0 is allowed up to twice the true sparsity.
    assert figures["recovered"] >= 0.9
    assert 3.0 <= figures["l0"] <= 8.0


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_topk_saes_recover_the_dictionary_with_the_auxk_loss(kind):
    loop = TrainLoop(batch_size=1024, steps=3000, lr=3e-3, warmup_steps=100, log_every=1000,
                     dead_after_patches=20_000, aux_k=32)
    figures = train_and_measure(SAETrainSpec(kind=kind, k=4, expansion=4), loop, code_floor=0.0)
    # Measured here: topk 1.000 / L0 4.00; batchtopk 0.992 / L0 4.03. Without the AuxK loss
    # (aux_alpha=0) the same runs recover 0.863 and 0.777: dead latents never come back.
    assert figures["recovered"] >= 0.95
    assert abs(figures["l0"] - 4) < 0.25


def test_unit_mean_norm_scale_is_recorded_and_applied(tmp_path):
    from pipeline.sae import load_sae, save_sae

    x = torch.randn(4096, 16) * 7.0 + 2.0
    loop = TrainLoop(batch_size=256, steps=5, warmup_steps=0)
    sae, _ = train(x, SAETrainSpec(expansion=2, scale="unit_mean_norm"), loop, log=lambda _: None)
    s = sae.spec.input_scale
    assert (x * s).norm(dim=1).mean().item() == pytest.approx(1.0, rel=0.02)
    assert torch.allclose(sae.b_dec, (x * s).mean(0), atol=0.05)  # b_dec starts at the scaled mean
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    with torch.no_grad():  # the build's encoder calls encode(raw features): the scale is inside
        expected = torch.relu((x * s - sae.b_dec) @ sae.W_enc + sae.b_enc)
        assert torch.allclose(loaded.encode(x), expected, atol=1e-5)
    unscaled, _ = train(x, SAETrainSpec(expansion=2), loop, log=lambda _: None)
    assert unscaled.spec.input_scale == 1.0


def test_non_finite_patches_are_counted_and_skipped():
    x = torch.randn(2048, 8)
    x[::100, 3] = float("nan")
    x[5, 0] = float("inf")
    logged = []
    sae, history = train(x, SAETrainSpec(expansion=2), TrainLoop(batch_size=512, steps=20, warmup_steps=0),
                         log=logged.append)
    assert sae.spec.metadata["skipped_nonfinite_patches"] == 22
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert "skipped_nonfinite_patches" in logged[0] and all(h["loss"] == h["loss"] for h in history)
    with pytest.raises(ValueError, match="no finite activations"):
        train(torch.full((4, 8), float("nan")), SAETrainSpec(expansion=2), TrainLoop(steps=1), log=lambda _: None)


def test_activation_files_npy_and_parquet(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import ConfigError
    from pipeline.config import TrainSourceConfig
    from pipeline.train_sae import activation_files, read_activation_chunks

    a = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    c = np.arange(18, dtype=np.float32).reshape(3, 6)
    pq.write_table(pa.table({"id": [1, 2, 3], "x": pa.FixedSizeListArray.from_arrays(pa.array(c.ravel()), 6)}),
                   tmp_path / "c.parquet")
    cfg = TrainSourceConfig(format="activations", root=str(tmp_path))
    files = activation_files(cfg)
    assert [shape for _, shape in files] == [(10, 6), (5, 6), (3, 6)]
    chunks = list(read_activation_chunks({"path": [p for p, _ in files]}, cfg=cfg, chunk_rows=4))
    assert all(c["x"].dtype == np.float32 and len(c["x"]) <= 4 for c in chunks)
    acts = np.concatenate([c["x"] for c in chunks])
    assert np.array_equal(acts, np.concatenate([a, b.astype(np.float32), c]))

    np.save(tmp_path / "d.npy", np.zeros((2, 7), np.float32))
    with pytest.raises(ConfigError, match=r"\(2, 7\).*\(10, 6\)"):
        activation_files(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no activations"):
        activation_files(TrainSourceConfig(format="activations", root=str(tmp_path / "empty")))


def test_cli_trains_on_ray_train_and_writes_both_formats(tmp_path):
    import json
    import subprocess
    import sys

    import numpy as np
    import yaml

    from pipeline.sae import load_sae

    np.save(tmp_path / "acts.npy", np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32))
    config = {"source": {"format": "activations", "root": str(tmp_path / "acts.npy")},
              "sae": {"expansion": 2}, "train": {"batch_size": 256, "steps": 30, "warmup_steps": 5, "log_every": 10,
                                                 "checkpoint_every": 10, "shuffle_buffer": 1024},
              "ray": {"num_cpus": 2}, "output": str(tmp_path / "ckpt")}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "pipeline.train_sae", "--config", str(tmp_path / "train.yaml")]
    proc = subprocess.run(command + ["--set", "sae.alpha=1e-3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train_sae: 100%" in proc.stderr  # the progress bar
    sae, saev = load_sae(tmp_path / "ckpt"), load_sae(tmp_path / "ckpt" / "saev-0.1.pt")
    x = torch.randn(4, 8)
    assert sae.spec.d == 8 and sae.spec.m == 16 and torch.equal(sae.encode(x), saev.encode(x))
    assert sae.spec.metadata["config"]["sae"]["alpha"] == 1e-3 and sae.spec.metadata["patches"] == 30 * 256
    metrics = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 10, 20, 29]
    assert {"mse", "nmse", "l0", "l1", "dead", "dense"} <= set(metrics[-1])
    assert sae.spec.metadata["final"] == metrics[-1]
    assert len(list((tmp_path / "ckpt" / "ray_train").glob("checkpoint_2*"))) == 2  # keep_checkpoints

    # A resume with another α is refused before anything runs, naming the key; more steps are fine.
    proc = subprocess.run(command + ["--set", "sae.alpha=2e-3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "sae.alpha: 0.001 → 0.002" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- on Ray Train (session Ray)

def activation_run(tmp_path, x, name, **train):
    import numpy as np

    from pipeline.config import validate
    from pipeline.config import TrainSAEConfig

    data = tmp_path / "acts.npy"
    if not data.exists():
        np.save(data, x.numpy())
    loop = {"batch_size": 256, "steps": 40, "lr": 3e-3, "warmup_steps": 5, "log_every": 5, "checkpoint_every": 10,
            "shuffle_buffer": 1024, **train}
    return validate(TrainSAEConfig, {"source": {"format": "activations", "root": str(data)},
                                     "sae": {"expansion": 2, "alpha": 1e-3}, "train": loop,
                                     "output": str(tmp_path / name)})


def test_interrupted_run_resumes_to_the_same_weights(ray_local, tmp_path):
    import json

    from pipeline.sae import load_sae
    from pipeline.train_sae import fit

    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(0))  # 11 batches per epoch
    done = load_sae(fit(activation_run(tmp_path, x, "uninterrupted"), log=lambda _: None))

    interrupted = activation_run(tmp_path, x, "interrupted", fail_at_step=20)
    with pytest.raises(Exception, match="injected failure after step 20"):
        fit(interrupted, log=lambda _: None)
    assert not (tmp_path / "interrupted" / "config.json").exists()
    resumed = load_sae(fit(interrupted, log=lambda _: None))  # the same command again

    # Ray Train's own recovery (max_failures) goes through the same checkpoint.
    recovered = load_sae(fit(activation_run(tmp_path, x, "recovered", fail_at_step=30, max_failures=1),
                             log=lambda _: None))
    for sae in (resumed, recovered):
        for key, value in done.state_dict().items():
            assert torch.equal(sae.state_dict()[key], value), key
    rows = {name: [{k: v for k, v in json.loads(r).items() if k != "elapsed_s"}  # wall time differs
                   for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("uninterrupted", "interrupted", "recovered")}
    assert rows["interrupted"] == rows["uninterrupted"] == rows["recovered"]
    assert [r["step"] for r in rows["interrupted"]] == [0, 5, 10, 15, 20, 25, 30, 35, 39]


def test_resume_with_another_config_or_another_d_is_refused(ray_local, tmp_path):
    import numpy as np

    from pipeline.config import ConfigError
    from pipeline.train_sae import fit

    x = torch.randn(1000, 16)
    fit(activation_run(tmp_path, x, "run", steps=5, checkpoint_every=5), log=lambda _: None)
    changed = activation_run(tmp_path, x, "run", steps=5, lr=1e-2, seed=3)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.003 → 0\.01; train\.seed: 0 → 3"):
        fit(changed, log=lambda _: None)
    np.save(tmp_path / "acts.npy", np.zeros((1000, 24), np.float32))  # same config, other activations
    with pytest.raises(ConfigError, match=r"\[n, 24\].*\[n, 16\]"):
        fit(activation_run(tmp_path, x, "run", steps=10), log=lambda _: None)


def test_two_gloo_workers_match_one_worker_at_the_same_global_batch(ray_local, tmp_path):
    from pipeline.sae import load_sae
    from pipeline.train_sae import fit

    x, dictionary = planted_dictionary(d=32, n_atoms=64, n=20_000, k=3)
    figures = {}
    for workers in (1, 2):
        cfg = activation_run(tmp_path, x, f"workers{workers}", batch_size=512, steps=400, lr=3e-3, warmup_steps=50,
                             checkpoint_every=400, log_every=100, shuffle_buffer=4096, num_workers=workers,
                             cpus_per_worker=0.5, dead_after_patches=20_000, aux_k=32)
        cfg.sae.kind, cfg.sae.k, cfg.sae.expansion = "topk", 3, 4
        sae = load_sae(fit(cfg, log=lambda _: None))
        best_cos = (dictionary @ sae.W_dec.T).max(dim=1).values
        figures[workers] = {"recovered": (best_cos > 0.9).float().mean().item(),
                            "nmse": sae.spec.metadata["final"]["nmse"]}
    print(f"\n1 worker: {figures[1]}; 2 workers: {figures[2]}")
    assert figures[1]["recovered"] >= 0.9 and figures[2]["recovered"] >= 0.9
    assert abs(figures[1]["nmse"] - figures[2]["nmse"]) <= max(0.02, 0.25 * figures[1]["nmse"])
