import io
import json

import pytest
import torch

from pipeline.sae import SAESpec, SparseAutoencoder, TopK, load_sae, save_sae, save_saev_schema5
from pipeline.config import SAETrainSpec, TrainLoop
from pipeline.sae_training import train


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
    # The project format keeps the scale; saev's schema-5 layout has none, so the export folds it into the weights.
    for loaded in (load_sae(save_sae(sae, tmp_path / "proj")), load_sae(save_saev_schema5(sae, tmp_path / "sae.pt"))):
        assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
    assert load_sae(tmp_path / "proj").spec.input_scale == 0.5
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


def test_topk_keeps_exactly_k_per_row():
    sae = SparseAutoencoder(SAESpec(d=16, m=128, kind="topk", k=5))
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every pre-activation positive, so exactly k survive
        codes = sae.encode(torch.randn(3, 7, 16))
    assert codes.shape == (3, 7, 128)
    assert ((codes > 0).sum(-1) == 5).all()
    pre = sae.pre_activation(torch.randn(4, 16)).detach()
    kept = TopK(5)(pre)
    assert torch.equal(kept.topk(5).values, torch.relu(pre.topk(5).values))


def test_batchtopk_shares_a_budget_in_training_and_uses_its_threshold_at_inference(tmp_path):
    sae = SparseAutoencoder(SAESpec(d=16, m=128, kind="batchtopk", k=4))
    x = torch.randn(32, 16)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)
        codes = sae.encode(x)
    assert (codes > 0).sum() == 4 * 32 and (codes > 0).sum(-1).float().std() > 0  # rows share the budget
    theta = sae.activation.threshold.item()
    assert theta == pytest.approx(codes[codes > 0].min().item())
    sae.eval()
    with torch.no_grad():
        pre = sae.pre_activation(x)
        assert torch.equal(sae.encode(x), pre * (pre > theta))
    loaded = load_sae(save_sae(sae, tmp_path / "btk")).eval()
    assert loaded.spec.kind == "batchtopk" and loaded.activation.threshold.item() == pytest.approx(theta)
    assert torch.allclose(loaded.encode(x), sae.encode(x))
    saev = load_sae(save_saev_schema5(sae, tmp_path / "btk.pt")).eval()
    assert torch.allclose(saev.encode(x), sae.encode(x), atol=1e-5)


def test_unknown_kind_and_missing_k_name_the_key():
    with pytest.raises(ValueError, match="sae.kind"):
        SparseAutoencoder(SAESpec(d=4, m=8, kind="gated"))
    with pytest.raises(ValueError, match="sae.k"):
        SparseAutoencoder(SAESpec(d=4, m=8, kind="topk"))


def test_topk_loss_has_no_l1_term():
    sae = SparseAutoencoder(SAESpec(d=8, m=32, kind="topk", k=3))
    out = sae.loss(torch.randn(64, 8), alpha=10.0)
    assert out["loss"].item() == pytest.approx(out["mse"].item())
