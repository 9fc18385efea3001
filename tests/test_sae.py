import io
import json

import pytest
import torch

from actors.sae import SAESpec, SparseAutoencoder, load_sae, save_sae, save_saev
from pipeline.train_sae import SAETrainSpec, TrainLoop, train


def random_state(d=12, m=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, m, generator=g), "b_enc": torch.randn(m, generator=g) * 0.1,
            "W_dec": torch.randn(m, d, generator=g), "b_dec": torch.randn(d, generator=g)}


def test_saev_file_gives_the_design_formula_codes(tmp_path):
    """The saev format as the paper's authors released it: one JSON line, then torch.save."""
    state = random_state()
    path = tmp_path / "sae.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(json.dumps({"d_vit": 12, "exp_factor": 4, "n_reinit_samples": 0}).encode() + b"\n" + buf.getvalue())
    sae = load_sae(path)
    x = torch.randn(5, 12)
    expected = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    assert torch.allclose(sae.encode(x), expected, atol=1e-6)
    assert torch.allclose(sae.decode(expected), expected @ state["W_dec"] + state["b_dec"], atol=1e-5)


def test_project_format_round_trip_and_saev_export(tmp_path):
    sae = SparseAutoencoder(SAESpec(d=12, m=48, input_scale=0.5, metadata={"final": {"mse": 1.0}}))
    x = torch.randn(7, 12)
    for loaded in (load_sae(save_sae(sae, tmp_path / "proj")), load_sae(save_saev(sae, tmp_path / "sae.pt"))):
        assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-6)
        assert loaded.spec.input_scale == 0.5
    assert load_sae(tmp_path / "proj").spec.metadata == {"final": {"mse": 1.0}}


def test_bad_checkpoints_are_refused_with_shapes(tmp_path):
    state = random_state()
    state["W_dec"] = torch.randn(48, 13)
    buf = io.BytesIO()
    torch.save(state, buf)
    (tmp_path / "bad.pt").write_bytes(b"{}\n" + buf.getvalue())
    with pytest.raises(ValueError, match=r"\(48, 13\)"):
        load_sae(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x80garbage\n")
    with pytest.raises(ValueError, match="first line is not JSON"):
        load_sae(tmp_path / "junk.pt")


def test_parallel_gradient_component_is_removed():
    sae = SparseAutoencoder(SAESpec(d=8, m=32))
    sae.loss(torch.randn(64, 8), alpha=1e-3)["loss"].backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() > 1e-6  # there was a parallel part
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6


def test_training_recipe_bdec_at_mean_unit_rows_and_l1_warmup():
    acts = torch.randn(4096, 8) * 0.3 + torch.arange(8.0)
    loop = TrainLoop(batch_size=256, steps=1, lr=1e-12, warmup_steps=0)
    sae, _ = train(acts, SAETrainSpec(expansion=4, alpha=1e-3), loop, log=lambda _: None)
    assert torch.allclose(sae.b_dec, acts.mean(0), atol=0.02)  # b_dec starts at the data mean

    loop = TrainLoop(batch_size=256, steps=30, lr=1e-2, warmup_steps=5, l1_warmup_steps=20, log_every=1)
    sae, history = train(acts, SAETrainSpec(expansion=4, alpha=1e-2), loop, log=lambda _: None)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    alphas = [h["alpha"] for h in history]
    assert alphas[0] == pytest.approx(1e-2 / 20) and alphas[-1] == pytest.approx(1e-2)
    # the warm-up really changes the loss: loss = mse + alpha * l1 with the scheduled alpha
    for h in history:
        assert h["loss"] == pytest.approx(h["mse"] + h["alpha"] * h["l1"], rel=1e-3, abs=1e-5)
    assert history[-1]["mse"] < history[0]["mse"]
