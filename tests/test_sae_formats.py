"""Every saev checkpoint layout read right or refused, and exports saev can open.

The saev 0.1 layout is tested against the real saev==0.1.0 package (scripts/setup.sh installs it
without its dependencies: its nn module needs only torch, beartype, einops and jaxtyping). The
schema layouts are saev's repository's (src/saev/nn/modeling.py, SCHEMA_VERSION 5), which PyPI does
not carry: those files are built here from the published header layout, and the expected codes are
computed here from saev's formulas (encode act(x · W_enc + b_enc); TopK keeps the k largest
pre-activations as they are; BatchTopK is x where x > θ at inference, a ReLU while θ ≤ 0)."""

import io
import json

import pytest
import saev.config
import saev.nn
import torch

from pipeline.sae import (SAEV_01_KEYS, CheckpointError, SAESpec, SparseAutoencoder, load_sae, save_saev,
                          save_saev_schema5)

D, M = 16, 64


def test_the_cpu_torch_is_still_the_one_in_place():
    """saev declares torch and CUDA-pulling packages; installed without them, the CPU build stays."""
    assert torch.cuda.is_available() or (torch.__version__.endswith("+cpu") and not torch.version.cuda)


def random_like(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def inputs(seed: int = 1, n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- saev 0.1 (the real package)

def test_saev_01_dump_loads_with_identical_codes(tmp_path):
    theirs = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=D, exp_factor=M // D))
    random_like(theirs, 0)
    saev.nn.dump(str(tmp_path / "theirs.pt"), theirs)
    x = inputs()
    with torch.no_grad():
        _, expected, _ = theirs(x)
        ours = load_sae(tmp_path / "theirs.pt")
        assert ours.spec.kind == "relu" and ours.spec.subtract_b_dec
        codes = ours.encode(x)
    print(f"\n[saev 0.1 dump → load] largest code difference {largest_difference(codes, expected)}")
    assert torch.equal(codes, expected)


def test_our_saev_01_export_opens_in_saev_with_identical_codes(tmp_path):
    ours = SparseAutoencoder(SAESpec(d=D, m=M))
    random_like(ours, 2)
    path = save_saev(ours, tmp_path / "saev-0.1.pt")
    assert tuple(json.loads(path.read_bytes().split(b"\n", 1)[0])) == SAEV_01_KEYS  # exactly saev 0.1.0's keys
    theirs = saev.nn.load(str(path))
    x = inputs()
    with torch.no_grad():
        _, codes, _ = theirs(x)
        expected = ours.encode(x)
        assert torch.equal(theirs.decode(codes), ours.decode(codes))
    print(f"\n[our saev 0.1 export → saev.nn.load] largest code difference {largest_difference(codes, expected)}")
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("spec, why", [
    (SAESpec(d=D, m=M, kind="topk", k=4), "topk SAE"),
    (SAESpec(d=D, m=M, input_scale=0.5), "scales its input"),
    (SAESpec(d=D, m=M, subtract_b_dec=False), "does not subtract b_dec"),
    (SAESpec(d=D, m=D * 4 + 1), "not a multiple"),
])
def test_the_saev_01_layout_refuses_what_it_cannot_hold(tmp_path, spec, why):
    with pytest.raises(CheckpointError, match=f"{why}.*schema-5"):
        save_saev(SparseAutoencoder(spec), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- saev schema layouts

AUXK = {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 1 / 32}}
ACTIVATIONS = {
    "Relu": {"cls": "Relu", "params": {"key": "relu", "sparsity": {"cls": "L1Sparsity", "params": {"key": "l1-sparsity",
                                                                                                   "coeff": 4e-4}},
                                       "aux": {"cls": "NoAux", "params": {"key": "no-aux"}}}},
    "TopK": {"cls": "TopK", "params": {"key": "top-k", "top_k": 6, "sparsity": {"cls": "NoSparsity", "params": {}},
                                       "aux": AUXK}},
    "BatchTopK": {"cls": "BatchTopK", "params": {"key": "batch-top-k", "top_k": 6, "momentum": 0.1, "aux": AUXK,
                                                 "sparsity": {"cls": "NoSparsity", "params": {}}}},
}


def schema_file(path, activation: dict, *, schema: int = 5, threshold: float | None = None, extra=None, drop=None,
                header_extra=None):
    """A saev schema-N file laid out as saev's dump writes it: header line, then the state dict."""
    g = torch.Generator().manual_seed(3)
    state = {"W_dec": torch.randn(M, D, generator=g), "b_dec": torch.randn(D, generator=g),
             "W_enc": torch.randn(D, M, generator=g) * 0.5, "b_enc": torch.randn(M, generator=g) * 0.1}
    if threshold is not None:
        state["activation.threshold"] = torch.tensor(threshold)
    state |= extra or {}
    for key in drop or ():
        state.pop(key)
    header = {"schema": schema, "cfg": {"d_model": D, "d_sae": M, "activation": activation, "reinit_blend": 0.8,
                                        "reinit_enc_dec_tranpose": True, "remove_parallel_grads": True,
                                        "normalize_w_dec": True}, "commit": "e7ca004", "lib": "1.0.0"}
    header |= header_extra or {}
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(json.dumps(header).encode() + b"\n" + buf.getvalue())
    return path, state


def saev_codes(name: str, h: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """saev's activations (modeling.py), written out here."""
    if name == "Relu":
        return torch.relu(h)
    if name == "TopK":
        _, idx = h.topk(6, dim=-1)
        return torch.zeros_like(h).scatter(-1, idx, 1.0) * h
    return torch.where(h > threshold, h, torch.zeros_like(h)) if threshold > 0 else torch.relu(h)


@pytest.mark.parametrize("name, threshold", [("Relu", None), ("TopK", None), ("BatchTopK", 0.4), ("BatchTopK", 0.0)])
def test_schema_5_files_give_saevs_codes(tmp_path, name, threshold):
    # TopK: every pre-activation negative, so saev's TopK (no ReLU) and ours (ReLU) could not agree by chance.
    extra = {"b_enc": torch.full((M,), -50.0)} if name == "TopK" else None
    path, state = schema_file(tmp_path / "sae.pt", ACTIVATIONS[name], threshold=threshold, extra=extra)
    x = inputs() * 3
    h = x @ state["W_enc"] + state["b_enc"]  # no b_dec subtraction since schema 2
    expected = saev_codes(name, h, threshold or 0.0)
    with torch.no_grad():
        codes = load_sae(path).eval().encode(x)
    print(f"\n[saev schema 5 {name} θ={threshold}] largest code difference {largest_difference(codes, expected)}")
    assert torch.equal(codes, expected)
    if name == "TopK":
        assert (codes < 0).any()  # saev's TopK keeps negative pre-activations: read as such, not as ours
    # the subtraction the old code always made changes the codes: the test would see it
    assert not torch.equal(saev_codes(name, (x - state["b_dec"]) @ state["W_enc"] + state["b_enc"], threshold or 0.0),
                           expected)


@pytest.mark.parametrize("subtract", [True, False])
def test_schema_1_reads_only_with_an_explicit_subtract_b_dec(tmp_path, subtract):
    path, state = schema_file(tmp_path / "s1.pt", ACTIVATIONS["Relu"], schema=1)
    with pytest.raises(CheckpointError, match="schema-1.*sae.subtract_b_dec: true .* or false"):
        load_sae(path)
    x = inputs()
    h = (x - state["b_dec"] if subtract else x) @ state["W_enc"] + state["b_enc"]
    with torch.no_grad():
        assert torch.equal(load_sae(path, subtract_b_dec=subtract).encode(x), torch.relu(h))


@pytest.mark.parametrize("change, message", [
    ({"header_extra": {"schema": 9}}, "unknown saev header schema 9"),
    ({"activation": {"cls": "JumpRelu", "params": {}}}, "cfg.activation.cls 'JumpRelu'"),
    ({"activation": {"cls": "TopK", "params": {"top_k": 0}}}, "top_k is 0"),
    ({"extra": {"W_skip": torch.zeros(D)}}, r"unknown \['W_skip'\]"),
    ({"drop": ["b_enc"]}, r"missing \['b_enc'\]"),
    ({"activation": ACTIVATIONS["BatchTopK"]}, r"missing \['activation.threshold'\]"),
])
def test_headers_and_weights_that_cannot_be_mapped_are_refused(tmp_path, change, message):
    activation = change.pop("activation", ACTIVATIONS["Relu"])
    path, _ = schema_file(tmp_path / "bad.pt", activation, **change)
    with pytest.raises(CheckpointError, match=message):
        load_sae(path)


def test_a_subtract_b_dec_that_contradicts_the_layout_is_refused(tmp_path):
    path, _ = schema_file(tmp_path / "s5.pt", ACTIVATIONS["Relu"])
    with pytest.raises(CheckpointError, match="never subtracts b_dec; remove sae.subtract_b_dec"):
        load_sae(path, subtract_b_dec=True)
    old = save_saev(SparseAutoencoder(SAESpec(d=D, m=M)), tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="always subtracts b_dec"):
        load_sae(old, subtract_b_dec=False)
    (tmp_path / "odd.pt").write_bytes(json.dumps({"d_vit": D, "exp_factor": 4, "whitening": True}).encode() + b"\n")
    with pytest.raises(CheckpointError, match=r"unknown keys \['whitening'\]"):
        load_sae(tmp_path / "odd.pt")


# --------------------------------------------------------------------------- our schema-5 export

@pytest.mark.parametrize("spec", [SAESpec(d=D, m=M), SAESpec(d=D, m=M, input_scale=0.25),
                                  SAESpec(d=D, m=M, kind="batchtopk", k=6)])
def test_schema_5_export_folds_scale_and_subtraction_and_keeps_the_codes(tmp_path, spec):
    ours = SparseAutoencoder(spec)
    random_like(ours, 4)
    if spec.kind == "batchtopk":
        ours.activation.threshold.fill_(0.3)
    ours.eval()
    path = save_saev_schema5(ours, tmp_path / "saev-schema5.pt")
    header = json.loads(path.read_bytes().split(b"\n", 1)[0])
    assert header["schema"] == 5 and set(header["cfg"]) >= {"d_model", "d_sae", "activation"}
    assert header["cfg"]["activation"]["cls"] == {"relu": "Relu", "batchtopk": "BatchTopK"}[spec.kind]
    back = load_sae(path).eval()
    x = inputs() * 2
    with torch.no_grad():
        codes, expected = back.encode(x), ours.encode(x)
        # the same function by saev's formula, from the file's own weights
        h = x @ back.W_enc + back.b_enc
        assert torch.equal(codes, saev_codes("BatchTopK" if spec.kind == "batchtopk" else "Relu", h, 0.3))
        assert torch.allclose(back.decode(codes), ours.decode(codes) / spec.input_scale, atol=1e-4)
    print(f"\n[our schema-5 export {spec.kind} s={spec.input_scale}] largest code difference "
          f"{largest_difference(codes, expected):.2e}")
    assert torch.allclose(codes, expected, atol=1e-5)


def test_schema_5_export_refuses_a_topk_that_clips_at_zero(tmp_path):
    with pytest.raises(CheckpointError, match="clips the kept values at 0"):
        save_saev_schema5(SparseAutoencoder(SAESpec(d=D, m=M, kind="topk", k=4)), tmp_path / "t.pt")
