"""The sparse autoencoder (ReLU + L1, as in the paper; TopK and BatchTopK too) and its checkpoint formats.

    encode  f(x) = act((x·s − b_dec) · W_enc + b_enc)       W_enc [d, m]   (− b_dec: subtract_b_dec)
    decode  x̂    = f · W_dec + b_dec                        W_dec [m, d], rows unit-norm

``s`` is the activation scale recorded in the checkpoint (1.0 = raw activations, the paper).

Formats (read by :func:`load_sae`; each layout either read exactly or refused, naming the field)
- project (version 2): a folder with ``config.json`` ({"format": "sae-traits", "version", "d", "m",
  "kind", "k", "input_scale", "subtract_b_dec", "relu_top_k", "metadata"}) and ``model.safetensors``.
  Version 1 folders (before subtract_b_dec / relu_top_k existed) read as both true.
- saev 0.1 (:data:`SAEV_01_KEYS`; saev 0.1.0 on PyPI, the paper's release): one JSON line of the
  config, a newline, then a ``torch.save``d state dict W_enc [d, m], b_enc [m], W_dec [m, d],
  b_dec [d]. ReLU, and encode subtracts b_dec. Written by :func:`save_saev`.
- saev schema 2–5 (saev's repository): a header ``{"schema", "cfg": {"d_model", "d_sae",
  "activation": {"cls": "Relu" | "TopK" | "BatchTopK", "params"}, ...}, "commit", "lib"}``, then
  the state dict (+ ``activation.threshold`` for BatchTopK). Encode is ``act(x · W_enc + b_enc)``
  — no b_dec subtraction — and saev's TopK keeps the k largest pre-activations as they are
  (no ReLU). Schema 1 exists with and without the subtraction: read only with an explicit
  ``sae.subtract_b_dec``. Written by :func:`save_saev_schema5`.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline import storage

FORMAT_VERSION = 2
SAEV_SCHEMA = 5  # the newest saev header schema this code reads and writes
# saev 0.1.0's config (saev.config.SparseAutoencoder): its nn.load passes these keys, and only these, to it.
SAEV_01_KEYS = ("d_vit", "exp_factor", "sparsity_coeff", "n_reinit_samples", "ghost_grads", "remove_parallel_grads",
                "normalize_w_dec", "seed")


@dataclass
class SAESpec:
    d: int
    m: int
    kind: str = "relu"  # relu | topk | batchtopk
    k: int | None = None  # active latents per patch (topk) or per patch on average (batchtopk)
    input_scale: float = 1.0
    subtract_b_dec: bool = True  # encode subtracts b_dec first (the paper, saev 0.1); saev schema >= 2 does not
    relu_top_k: bool = True  # topk: kept values are clipped at 0 (ours); saev's TopK keeps them as they are
    metadata: dict = field(default_factory=dict)  # training figures, provenance


# --------------------------------------------------------------------------- activations
# Small interchangeable pieces: pre-activations [rows, m] → codes [rows, m].

class ReLU(nn.Module):
    """The paper's SAE: every positive pre-activation is a code (sparsity comes from the L1 loss)."""

    def forward(self, pre: Tensor) -> Tensor:
        if torch.is_grad_enabled() and pre.requires_grad:
            return torch.relu(pre)  # autograd needs the pre-activation kept
        return pre.relu_()  # the [rows, m] tensor is the big one: no extra pass


class TopK(nn.Module):
    """Exactly the k largest pre-activations of each row survive (clipped at 0 when ``relu``)."""

    def __init__(self, k: int, relu: bool = True):
        super().__init__()
        self.k, self.relu = k, relu

    def forward(self, pre: Tensor) -> Tensor:
        values, index = pre.topk(min(self.k, pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter_(-1, index, torch.relu(values) if self.relu else values)


class BatchTopK(nn.Module):
    """Training: the k·rows largest pre-activations of the whole batch survive (rows share a
    budget). Inference: a fixed threshold θ — the running mean of the smallest value kept in
    training — so a patch's codes do not depend on the rest of its batch."""

    def __init__(self, k: int, momentum: float = 0.01):
        super().__init__()
        self.k = k
        self.momentum = momentum
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def forward(self, pre: Tensor) -> Tensor:
        if not self.training:
            if torch.isnan(self.threshold):
                raise ValueError("BatchTopK SAE has no inference threshold: it was never trained")
            return pre * (pre > self.threshold)
        flat = torch.relu(pre).flatten()
        values, index = flat.topk(min(self.k * pre.shape[0], flat.numel()))
        with torch.no_grad():
            smallest = values[values > 0].min() if (values > 0).any() else values.new_tensor(0.0)
            self.threshold.copy_(smallest if torch.isnan(self.threshold)
                                 else torch.lerp(self.threshold, smallest, self.momentum))
        return torch.zeros_like(flat).scatter_(0, index, values).view_as(pre)


def make_activation(spec: SAESpec) -> nn.Module:
    if spec.kind == "relu":
        return ReLU()
    if spec.kind in ("topk", "batchtopk"):
        if not spec.k or spec.k < 1:
            raise ValueError(f"sae.k: a {spec.kind} SAE needs k >= 1 (got {spec.k})")
        return TopK(spec.k, spec.relu_top_k) if spec.kind == "topk" else BatchTopK(spec.k)
    raise ValueError(f"sae.kind: unknown kind {spec.kind!r} (relu, topk or batchtopk)")


class SparseAutoencoder(nn.Module):
    def __init__(self, spec: SAESpec):
        super().__init__()
        self.spec = spec
        self.activation = make_activation(spec)
        d, m = spec.d, spec.m
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        nn.init.kaiming_uniform_(self.W_enc)
        with torch.no_grad():
            self.W_dec.copy_(self.W_enc.T)
            self.normalize_decoder_()

    def pre_activation(self, x: Tensor) -> Tensor:
        """[..., d] → [rows, m] (the bias add fused into the matmul)."""
        if self.spec.input_scale != 1.0:
            x = x * self.spec.input_scale
        h = x - self.b_dec if self.spec.subtract_b_dec else x
        return torch.addmm(self.b_enc, h.reshape(-1, h.shape[-1]), self.W_enc)

    def encode(self, x: Tensor) -> Tensor:
        """[..., d] → [..., m] codes."""
        return self.activation(self.pre_activation(x)).reshape(*x.shape[:-1], -1)

    def decode(self, f: Tensor) -> Tensor:
        """[..., m] → [..., d] reconstruction (in scaled units)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def loss(self, x: Tensor, alpha: float, dead: Tensor | None = None, aux_k: int = 256,
             aux_alpha: float = 1 / 32) -> dict[str, Tensor]:
        """On a batch of activations [batch, d]: MSE + α·L1 for the ReLU SAE; for the TopK kinds
        MSE (sparsity is fixed by k, α unused) plus, when ``dead`` [m] marks latents that have
        not fired for a while, the AuxK loss: the ``aux_k`` largest dead latents must explain
        what the live ones left unexplained — which pulls dead latents back into use."""
        target = x * self.spec.input_scale
        pre = self.pre_activation(x)
        f = self.activation(pre)
        x_hat = self.decode(f)
        mse = (x_hat - target).pow(2).mean()
        l1 = f.abs().sum(dim=-1).mean()
        out = {"mse": mse, "l1": l1, "l0": (f > 0).float().sum(-1).mean(), "aux": torch.zeros_like(mse),
               "codes": f}  # the trainer tracks which latents fire
        if self.spec.kind == "relu":
            out["loss"] = mse + alpha * l1
            return out
        if dead is not None and dead.any():
            k = min(aux_k, int(dead.sum()))
            values, index = pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1)
            f_dead = torch.zeros_like(pre).scatter_(-1, index, torch.relu(values))
            residual = (target - x_hat).detach()
            out["aux"] = (f_dead @ self.W_dec - residual).pow(2).mean()
        out["loss"] = mse + aux_alpha * out["aux"]
        return out

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the part of each W_dec row's gradient parallel to the row (rows are unit-norm),
        so a step changes the direction of a decoder row, not its length."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)


# --------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    """A checkpoint that cannot be read (or written) exactly; the message names the field and what to do."""


def state_dict_of(sae: SparseAutoencoder) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": "sae-traits", "version": FORMAT_VERSION, **asdict(sae.spec)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state_dict_of(sae), str(folder / "model.safetensors"))
    return folder


def _write_saev(path: str | Path, header: dict, state: dict[str, Tensor]) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(json.dumps(header).encode() + b"\n" + buf.getvalue())
    return path


def save_saev(sae: SparseAutoencoder, path: str | Path) -> Path:
    """The saev 0.1 layout (``saev.nn.load`` of saev 0.1.0 opens it, with identical codes): exactly
    saev 0.1.0's header keys. It holds only what that saev computes — a ReLU SAE that subtracts
    b_dec, on raw activations, with m a multiple of d; anything else is refused (never written lossy)."""
    spec = sae.spec
    cannot = [why for bad, why in [
        (spec.kind != "relu", f"it is a {spec.kind} SAE (saev 0.1 knows only ReLU)"),
        (spec.input_scale != 1.0, f"it scales its input by {spec.input_scale} (saev 0.1 reads raw activations)"),
        (not spec.subtract_b_dec, "its encode does not subtract b_dec (saev 0.1's does)"),
        (spec.m % spec.d != 0, f"m={spec.m} is not a multiple of d={spec.d} (saev 0.1 stores exp_factor)")] if bad]
    if cannot:
        raise CheckpointError(f"the saev 0.1 layout cannot hold this SAE: {'; '.join(cannot)}; "
                              "write the saev schema-5 layout instead (save_saev_schema5)")
    trained = (spec.metadata.get("config") or {}).get("sae") or {}
    header = {"d_vit": spec.d, "exp_factor": spec.m // spec.d, "sparsity_coeff": trained.get("alpha", 4e-4),
              "n_reinit_samples": 0, "ghost_grads": False, "remove_parallel_grads": True, "normalize_w_dec": True,
              "seed": (spec.metadata.get("config") or {}).get("train", {}).get("seed", 0)}
    assert tuple(header) == SAEV_01_KEYS
    return _write_saev(path, header, state_dict_of(sae))


def save_saev_schema5(sae: SparseAutoencoder, path: str | Path) -> Path:
    """saev's schema-5 layout (``saev.nn.modeling.load`` opens it). Its encode is ``act(x · W_enc +
    b_enc)`` on raw activations, so an input scale s and a b_dec subtraction are folded into the
    weights — W_enc' = s·W_enc, b_enc' = b_enc − b_dec·W_enc, and W_dec, b_dec divided by s so the
    decoder reconstructs raw activations — which gives the same codes up to float rounding. Our
    TopK clips its kept values at 0 and saev's does not: such an SAE is refused."""
    spec = sae.spec
    if spec.kind == "topk" and spec.relu_top_k:
        raise CheckpointError("the saev schema-5 layout cannot hold this SAE: its TopK clips the kept values at 0 "
                              "(saev's TopK keeps negative ones); keep the project format")
    if spec.kind == "batchtopk" and torch.isnan(sae.activation.threshold):
        raise CheckpointError("the saev schema-5 layout cannot hold this SAE: its BatchTopK has no inference "
                              "threshold yet (never trained)")
    state = {k: v.double() for k, v in state_dict_of(sae).items()}
    s = spec.input_scale
    b_enc = state["b_enc"] - (state["b_dec"] @ state["W_enc"] if spec.subtract_b_dec else 0)
    folded = {"W_dec": state["W_dec"] / s, "b_dec": state["b_dec"] / s, "W_enc": state["W_enc"] * s, "b_enc": b_enc}
    if spec.kind == "batchtopk":
        folded["activation.threshold"] = state["activation.threshold"]
    folded = {k: v.float().contiguous() for k, v in folded.items()}
    alpha = ((spec.metadata.get("config") or {}).get("sae") or {}).get("alpha", 4e-4)
    auxk = {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 1 / 32}}
    no_sparsity = {"cls": "NoSparsity", "params": {"key": "no-sparsity"}}
    activation = {
        "relu": {"cls": "Relu", "params": {"key": "relu", "aux": {"cls": "NoAux", "params": {"key": "no-aux"}},
                                           "sparsity": {"cls": "L1Sparsity", "params": {"key": "l1-sparsity",
                                                                                        "coeff": alpha}}}},
        "topk": {"cls": "TopK", "params": {"key": "top-k", "top_k": spec.k, "sparsity": no_sparsity, "aux": auxk}},
        "batchtopk": {"cls": "BatchTopK", "params": {"key": "batch-top-k", "top_k": spec.k, "sparsity": no_sparsity,
                                                     "momentum": 0.1, "aux": auxk}},
    }[spec.kind]
    header = {"schema": SAEV_SCHEMA,
              "cfg": {"d_model": spec.d, "d_sae": spec.m, "activation": activation, "reinit_blend": 0.8,
                      "reinit_enc_dec_tranpose": True, "remove_parallel_grads": True, "normalize_w_dec": True},
              "commit": "unknown", "lib": "sae-traits"}
    return _write_saev(path, header, folded)


def _from_state(state: dict[str, Tensor], where: str, **spec_kwargs) -> SparseAutoencoder:
    """An SAE holding exactly ``state``: a missing or unknown key is an error, never dropped."""
    if not {"W_enc", "W_dec"} <= set(state):
        raise CheckpointError(f"sae.checkpoint: {where} lacks {sorted({'W_enc', 'W_dec'} - set(state))}")
    d, m = state["W_enc"].shape
    if tuple(state["W_dec"].shape) != (m, d):
        raise CheckpointError(f"sae.checkpoint: {where}: W_enc is {tuple(state['W_enc'].shape)} but W_dec is "
                              f"{tuple(state['W_dec'].shape)}; expected W_dec [{m}, {d}]")
    sae = SparseAutoencoder(SAESpec(d=d, m=m, **spec_kwargs))
    wanted = set(sae.state_dict())
    missing, unknown = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unknown:
        raise CheckpointError(f"sae.checkpoint: {where} does not hold a {sae.spec.kind} SAE's weights"
                              + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    sae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return sae


def sae_config_json(checkpoint: str | Path, storage_options: dict | None = None,
                    revision: str | None = None) -> dict | None:
    """The ``config.json`` of a project-format checkpoint (a local folder, any fsspec URL, e.g.
    s3://bucket/sae, or a hub repo), read without fetching the weights; None for a saev file or a
    folder without one."""
    hub = storage.hub_reference(str(checkpoint))
    if hub is not None:
        repo, file = hub
        if file is not None:
            return None  # one file of a repo: a saev file
        try:
            return json.loads(Path(storage.hub_path(f"{storage.HUB}{repo}/config.json", revision)).read_text())
        except FileNotFoundError:
            return None
    fs, path = storage.filesystem(str(checkpoint), storage_options)
    try:
        with fs.open(storage.join(path.rstrip("/"), "config.json"), "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def saev_spec(header: dict, where: str, subtract_b_dec: bool | None = None) -> dict:
    """SAESpec keyword arguments that reproduce a saev file's codes exactly, from its header; a
    header that cannot be mapped with certainty is refused, naming the field and what to do."""
    if "schema" not in header:  # saev 0.1 (and this project's exports before the schema layouts)
        ours = header.get("sae_traits") or {}
        unknown = sorted(set(header) - set(SAEV_01_KEYS) - {"sae_traits", "d_sae", "l1_coeff", "use_ghost_grads"})
        if unknown:
            raise CheckpointError(f"sae.checkpoint: {where}: a saev 0.1 header with unknown keys {unknown} "
                                  f"(saev 0.1 has {list(SAEV_01_KEYS)}); refusing to guess what they change")
        if subtract_b_dec is False:
            raise CheckpointError(f"sae.checkpoint: {where} is a saev 0.1 file, whose encode always subtracts b_dec; "
                                  "remove sae.subtract_b_dec")
        return {"kind": ours.get("kind", "relu"), "k": ours.get("k"), "input_scale": ours.get("input_scale", 1.0),
                "subtract_b_dec": True}
    schema = header["schema"]
    if not isinstance(schema, int) or not 1 <= schema <= SAEV_SCHEMA:
        raise CheckpointError(f"sae.checkpoint: {where}: unknown saev header schema {schema!r} (this code reads the "
                              f"saev 0.1 layout and schemas 1 to {SAEV_SCHEMA}); convert it with a saev that reads it")
    cfg = header.get("cfg") or {}
    if schema == 1:
        if subtract_b_dec is None:
            raise CheckpointError(
                f"sae.checkpoint: {where} is a saev schema-1 file; schema 1 was written both before and after saev "
                "stopped subtracting b_dec in encode (commit e7ca004, 2025-07-31), so its header cannot say which: "
                "set sae.subtract_b_dec: true (trained before that commit) or false (after)")
        cls = header.get("cls") if header.get("cls") in ("Relu", "TopK", "BatchTopK") else None
        activation = {"cls": cls, "params": {"top_k": cfg.get("top_k")}} if cls else cfg.get("activation") or {}
    else:
        if subtract_b_dec is True:
            raise CheckpointError(f"sae.checkpoint: {where} is a saev schema-{schema} file, whose encode never "
                                  "subtracts b_dec; remove sae.subtract_b_dec")
        subtract_b_dec = False
        activation = cfg.get("activation") or {}
    cls, params = activation.get("cls"), activation.get("params") or {}
    if cls == "Relu":
        return {"kind": "relu", "subtract_b_dec": subtract_b_dec}
    if cls in ("TopK", "BatchTopK"):
        if not isinstance(params.get("top_k"), int) or params["top_k"] < 1:
            raise CheckpointError(f"sae.checkpoint: {where}: cfg.activation.params.top_k is {params.get('top_k')!r}")
        kind = "topk" if cls == "TopK" else "batchtopk"
        return {"kind": kind, "k": params["top_k"], "subtract_b_dec": subtract_b_dec, "relu_top_k": False}
    raise CheckpointError(f"sae.checkpoint: {where}: cfg.activation.cls {cls!r} is not one this code reads "
                          "(Relu, TopK, BatchTopK); its codes would be guessed")


def load_sae(path: str | Path, storage_options: dict | None = None, subtract_b_dec: bool | None = None,
             revision: str | None = None) -> SparseAutoencoder:
    """Load any of the formats above; a folder is the project's, a file is saev's. A remote checkpoint
    (s3://...) is copied to this node's cache first, a hub one (hf://...) to the hub's cache at
    ``revision`` (:func:`pipeline.storage.local_copy`). ``subtract_b_dec`` (``sae.subtract_b_dec``)
    is needed only for a saev schema-1 file."""
    path = Path(storage.local_path(str(path), storage_options, revision))
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        if config.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: SAE format version {config['version']} is newer than this code reads")
        kwargs = {k: config[k] for k in ("kind", "k", "input_scale", "subtract_b_dec", "relu_top_k", "metadata")
                  if k in config}
        return _from_state(load_file(str(path / "model.safetensors")), str(path), **kwargs)
    if not path.exists():
        raise FileNotFoundError(f"sae.checkpoint: {path} does not exist")
    with path.open("rb") as f:
        try:
            header = json.loads(f.readline())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"sae.checkpoint: {path} is neither a project folder nor a saev file "
                                  "(first line is not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"sae.checkpoint: {path}: the first line is JSON but not a saev header object")
        spec = saev_spec(header, str(path), subtract_b_dec)  # refused before the weights are read
        state = torch.load(f, map_location="cpu", weights_only=True)
    if spec["kind"] == "batchtopk" and "activation.threshold" in state and "schema" in header:
        # saev's BatchTopK is a ReLU until its threshold turns positive; ours is pre·(pre > θ): θ = max(θ, 0).
        state = {**state, "activation.threshold": state["activation.threshold"].clamp_min(0)}
    return _from_state(state, str(path), **spec, metadata={"saev_header": header})


def sae_metadata(checkpoint: str, storage_options: dict | None = None, revision: str | None = None) -> dict:
    """What a build's manifest records of its SAE: the checkpoint, and for a project folder its
    shape and training metadata (read from config.json alone)."""
    spec = sae_config_json(checkpoint, storage_options, revision)
    if spec is not None:
        return {"checkpoint": checkpoint, "d": spec.get("d"), "m": spec.get("m"), "metadata": spec.get("metadata", {})}
    return {"checkpoint": checkpoint}
