"""The sparse autoencoder (ReLU + L1, as in the paper) and its two checkpoint formats.

    encode  f(x) = ReLU((x·s − b_dec) · W_enc + b_enc)      W_enc [d, m]
    decode  x̂    = f · W_dec + b_dec                        W_dec [m, d], rows unit-norm

``s`` is the activation scale recorded in the checkpoint (1.0 = raw activations, the paper).

Formats
- project (version 1): a folder with ``config.json`` ({"format": "sae-traits", "version": 1, "d",
  "m", "kind", "input_scale", "metadata"}) and ``model.safetensors``.
- saev (the paper authors' release): one JSON line (d_vit, exp_factor, ...), a newline, then a
  ``torch.save``d state dict with W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d].
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

FORMAT_VERSION = 1


@dataclass
class SAESpec:
    d: int
    m: int
    kind: str = "relu"  # relu | topk | batchtopk
    k: int | None = None  # active latents per patch (topk) or per patch on average (batchtopk)
    input_scale: float = 1.0
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
    """Exactly the k largest (positive) pre-activations of each row survive."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, pre: Tensor) -> Tensor:
        values, index = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, index, torch.relu(values))


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
        return TopK(spec.k) if spec.kind == "topk" else BatchTopK(spec.k)
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
        h = x - self.b_dec
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

def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": "sae-traits", "version": FORMAT_VERSION, **asdict(sae.spec)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def save_saev(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write the saev format (one JSON line, then torch.save of the state dict)."""
    path = Path(path)
    header = {"d_vit": sae.spec.d, "exp_factor": sae.spec.m // sae.spec.d, "d_sae": sae.spec.m,
              "sae_traits": {"input_scale": sae.spec.input_scale, "kind": sae.spec.kind, "k": sae.spec.k}}
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in sae.state_dict().items()}, buf)
    path.write_bytes(json.dumps(header).encode() + b"\n" + buf.getvalue())
    return path


def _from_state(state: dict[str, Tensor], **spec_kwargs) -> SparseAutoencoder:
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(state)
    if missing:
        raise ValueError(f"SAE checkpoint lacks {sorted(missing)}")
    d, m = state["W_enc"].shape
    if tuple(state["W_dec"].shape) != (m, d):
        raise ValueError(f"SAE checkpoint: W_enc is {tuple(state['W_enc'].shape)} but W_dec is "
                         f"{tuple(state['W_dec'].shape)}; expected W_dec [{m}, {d}]")
    sae = SparseAutoencoder(SAESpec(d=d, m=m, **spec_kwargs))
    wanted = set(sae.state_dict())
    sae.load_state_dict({k: v.float() for k, v in state.items() if k in wanted}, strict=False)
    if "activation.threshold" in wanted and "activation.threshold" not in state:
        raise ValueError("SAE checkpoint: a batchtopk SAE needs its activation.threshold")
    return sae


def sae_config_json(checkpoint: str | Path, storage_options: dict | None = None) -> dict | None:
    """The ``config.json`` of a project-format checkpoint (a local folder or any fsspec URL, e.g.
    s3://bucket/sae), read without fetching the weights; None for a saev file or a folder without one."""
    fs, path = storage.filesystem(str(checkpoint), storage_options)
    try:
        with fs.open(storage.join(path.rstrip("/"), "config.json"), "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def load_sae(path: str | Path, storage_options: dict | None = None) -> SparseAutoencoder:
    """Load either format; a folder is the project's, a file is saev's. A remote checkpoint
    (s3://...) is copied to this node's cache first (:func:`pipeline.storage.local_copy`)."""
    path = Path(storage.local_copy(str(path), storage_options))
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        if config.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path}: SAE format version {config['version']} is newer than this code reads")
        kwargs = {k: config[k] for k in ("kind", "k", "input_scale", "metadata") if k in config}
        return _from_state(load_file(str(path / "model.safetensors")), **kwargs)
    if not path.exists():
        raise FileNotFoundError(f"sae.checkpoint: {path} does not exist")
    with path.open("rb") as f:
        try:
            header = json.loads(f.readline())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"sae.checkpoint: {path} is neither a project folder nor a saev file "
                             "(first line is not JSON)") from None
        state = torch.load(f, map_location="cpu", weights_only=True)
    ours = header.get("sae_traits", {})
    return _from_state(state, kind=ours.get("kind", "relu"), k=ours.get("k"),
                       input_scale=ours.get("input_scale", 1.0), metadata={"saev_config": header})


def sae_metadata(checkpoint: str, storage_options: dict | None = None) -> dict:
    """What a build's manifest records of its SAE: the checkpoint, and for a project folder its
    shape and training metadata (read from config.json alone)."""
    spec = sae_config_json(checkpoint, storage_options)
    if spec is not None:
        return {"checkpoint": checkpoint, "d": spec.get("d"), "m": spec.get("m"), "metadata": spec.get("metadata", {})}
    return {"checkpoint": checkpoint}
