"""Training state <-> bytes, and growing a checkpoint into the next phase's networks.

A checkpoint is data, never code: it holds only tensors, numbers and strings, and is read back with
`torch.load(weights_only=True)`. Optimizer state lives only within a phase: like the reference code, the
optimizers restart whenever the level of detail changes (at the start and at the end of every fade).
"""

from __future__ import annotations

import copy
import io
import pickle
import zipfile
from dataclasses import dataclass

import torch
from torch import nn

from service.spec import Spec
from workers.commit import CheckpointError, spec_identity, spec_mismatch
from workers.networks import Discriminator, Generator

FORMAT = 1


def adam(params, lr: float) -> torch.optim.Adam:
    """One kernel for all tensors on CUDA (fused), a few multi-tensor ops on CPU (foreach), not one op a tensor."""
    params = list(params)
    fused = params[0].is_cuda
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99), eps=1e-8, fused=fused, foreach=not fused)


@dataclass
class TrainingState:
    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_G: torch.optim.Adam
    opt_D: torch.optim.Adam
    phase: int
    phase_images: int  # images seen in this phase
    total_images: int  # images seen in the whole run, this phase included
    spec: dict  # spec_identity() of the spec it trains under

    @property
    def resolution(self) -> int:
        return self.G.resolution

    def payload(self) -> dict:
        """What a checkpoint holds, as live references to the training tensors (see `snapshot` for a copy)."""
        return {
            "format": FORMAT,
            "resolution": self.resolution,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "phase": self.phase,
            "phase_images": self.phase_images,
            "total_images": self.total_images,
            **self.spec,
            "rng": torch.get_rng_state(),
        }

    def to_bytes(self) -> bytes:
        return payload_bytes(self.payload())


def payload_bytes(payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def snapshot(payload, reuse=None):
    """A CPU copy of a payload that training may go on changing. Tensors are copied into `reuse` (the previous
    snapshot, no longer read by anyone) where shapes match, so that a checkpoint costs a memory copy, not an
    allocation that faults in hundreds of megabytes page by page; on CUDA the copies land in pinned memory."""
    if isinstance(payload, torch.Tensor):
        if not (isinstance(reuse, torch.Tensor) and reuse.shape == payload.shape and reuse.dtype == payload.dtype):
            reuse = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=payload.is_cuda)
        return reuse.copy_(payload, non_blocking=True)
    if isinstance(payload, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {k: snapshot(v, reuse.get(k)) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        reuse = reuse if isinstance(reuse, type(payload)) and len(reuse) == len(payload) else [None] * len(payload)
        return type(payload)(snapshot(v, r) for v, r in zip(payload, reuse))
    return copy.deepcopy(payload)


def load_payload(data: bytes, where: str = "checkpoint") -> dict:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0][:200]
        raise CheckpointError(f"{where}: not a readable checkpoint ({reason})") from None


def check_spec(payload: dict, spec: Spec, where: str = "checkpoint") -> None:
    mismatch = spec_mismatch(payload, spec)
    if mismatch:
        raise CheckpointError(f"{where}: checkpoint belongs to another spec ({mismatch})")


def build_networks(spec: Spec, resolution: int) -> tuple[Generator, Discriminator, Generator]:
    G = Generator(resolution, spec.channels, spec.latent_size, spec.fmap_base, spec.fmap_max)
    D = Discriminator(resolution, spec.channels, spec.fmap_base, spec.fmap_max)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    return G, D, G_ema


def on_device(net: nn.Module, device: torch.device) -> nn.Module:
    """Conv weights channels_last: oneDNN (CPU) and cuDNN's tensor-core kernels run NHWC without reorders."""
    return net.to(device, memory_format=torch.channels_last)


def load_generator(payload: dict, spec: Spec, ema: bool = True) -> Generator:
    """The (EMA) generator of a checkpoint, for sampling and evaluation."""
    check_spec(payload, spec)
    G = Generator(payload["resolution"], spec.channels, spec.latent_size, spec.fmap_base, spec.fmap_max)
    G.load_state_dict(payload["G_ema" if ema else "G"])
    return G.eval().requires_grad_(False)


def fresh_state(spec: Spec, phase: int, resolution: int, lr: float, device: torch.device) -> TrainingState:
    G, D, G_ema = (on_device(m, device) for m in build_networks(spec, resolution))
    return TrainingState(G, D, G_ema, adam(G.parameters(), lr), adam(D.parameters(), lr), phase, 0, 0,
                         spec_identity(spec))


def state_from_payload(payload: dict, spec: Spec, phase: int, resolution: int, lr: float, total_images: int,
                       device: torch.device) -> TrainingState:
    """Continue `phase` from a checkpoint: the same phase resumes with its optimizers and image count; an
    earlier phase's checkpoint is grown to `resolution` (every old weight kept) with fresh optimizers."""
    check_spec(payload, spec)
    G, D, G_ema = build_networks(spec, payload["resolution"])
    for net, key in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
        net.load_state_dict(payload[key])
    while G.resolution < resolution:
        for net in (G, D, G_ema):
            net.grow()
    new_layers = {k: v for k, v in G.state_dict().items() if k not in payload["G_ema"]}
    G_ema.load_state_dict(new_layers, strict=False)  # the EMA starts its new layers where G starts them
    G, D, G_ema = on_device(G, device), on_device(D, device), on_device(G_ema, device).requires_grad_(False)
    state = TrainingState(G, D, G_ema, adam(G.parameters(), lr), adam(D.parameters(), lr), phase, 0, total_images,
                          spec_identity(spec))
    if payload["phase"] == phase:
        state.opt_G.load_state_dict(payload["opt_G"])
        state.opt_D.load_state_dict(payload["opt_D"])
        state.phase_images, state.total_images = payload["phase_images"], payload["total_images"]
        torch.set_rng_state(payload["rng"])
    return state


def module_tensors(*modules: nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in m.state_dict().values()]
