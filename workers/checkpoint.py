"""Training state <-> bytes, and growing a checkpoint into the next phase's networks.

A checkpoint is data, never code: it holds only tensors, numbers and strings, and is read back with
`torch.load(weights_only=True)`. Optimizer state lives only within a phase: like the reference code, the
optimizers restart whenever the level of detail changes (at the start and at the end of every fade).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import zipfile
from dataclasses import dataclass

import torch
from torch import nn

from service.spec import Spec
from workers.networks import Discriminator, Generator

FORMAT = 1
COMMIT_MARKER = "COMMITTED"


class CheckpointError(ValueError):
    """A checkpoint that must not be used: torn, corrupt, of another spec, or without a valid commit record."""


def spec_identity(spec: Spec) -> dict:
    """What a checkpoint records of the spec it was trained under: the hash, and the fields behind it, so that a
    mismatch can be told field by field."""
    return {"spec_hash": spec.model_hash(), "spec_fields": json.dumps(spec.model_fields_that_matter(), sort_keys=True)}


def spec_mismatch(recorded: dict, spec: Spec) -> str | None:
    """None when `recorded` (a payload or a commit record) belongs to `spec`, else which fields differ."""
    if recorded.get("spec_hash") == spec.model_hash():
        return None
    try:
        fields = json.loads(recorded["spec_fields"])
        current = spec.model_fields_that_matter()
        diffs = [f"{k}: {fields[k]} -> {current[k]}" for k in current if k in fields and fields[k] != current[k]]
    except (KeyError, TypeError, ValueError):
        diffs = []
    return "; ".join(diffs) or f"spec hash {recorded.get('spec_hash')!r} is not {spec.model_hash()!r}"


def commit_record(data: bytes, spec: Spec, committed_at: float) -> dict:
    """The COMMITTED marker's content: what a reader checks the checkpoint's bytes and spec against."""
    return {"committed_at": committed_at, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            **spec_identity(spec)}


def parse_commit_record(text: bytes, where: str) -> dict:
    try:
        record = json.loads(text)
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
                and isinstance(record.get("size"), int)):
            raise ValueError("no sha256 and size")
    except ValueError as e:
        raise CheckpointError(f"{where}: the commit record is not valid ({str(e).splitlines()[0]})") from None
    return record


def verify_commit(data: bytes, record: dict, spec: Spec, where: str) -> None:
    """Refuse checkpoint bytes that are not the ones committed, or were committed under another spec."""
    if len(data) != record["size"]:
        raise CheckpointError(f"{where}: checkpoint is {len(data)} bytes, the commit recorded {record['size']}")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{where}: checkpoint sha256 does not match the commit record (corrupt)")
    mismatch = spec_mismatch(record, spec)
    if mismatch:
        raise CheckpointError(f"{where}: checkpoint was committed under another spec ({mismatch})")


def read_committed(fs, checkpoint_path: str, spec: Spec, where: str) -> bytes:
    """A committed checkpoint's bytes, verified against the COMMITTED marker beside it."""
    marker = f"{checkpoint_path.rsplit('/', 1)[0]}/{COMMIT_MARKER}"
    try:
        record = parse_commit_record(fs.cat_file(marker), where)
        data = fs.cat_file(checkpoint_path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{where}: {e.filename or 'a file'} is missing") from None
    verify_commit(data, record, spec, where)
    return data


def adam(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99), eps=1e-8)


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

    def to_bytes(self) -> bytes:
        payload = {
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
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()


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


def load_generator(payload: dict, spec: Spec, ema: bool = True) -> Generator:
    """The (EMA) generator of a checkpoint, for sampling and evaluation."""
    check_spec(payload, spec)
    G = Generator(payload["resolution"], spec.channels, spec.latent_size, spec.fmap_base, spec.fmap_max)
    G.load_state_dict(payload["G_ema" if ema else "G"])
    return G.eval().requires_grad_(False)


def fresh_state(spec: Spec, phase: int, resolution: int, lr: float, device: torch.device) -> TrainingState:
    G, D, G_ema = (m.to(device) for m in build_networks(spec, resolution))
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
    G, D, G_ema = G.to(device), D.to(device), G_ema.to(device).requires_grad_(False)
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
