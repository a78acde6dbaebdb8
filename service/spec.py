"""The job spec: a YAML file validated into typed, frozen models.

This module is the one piece of `service/` that the data plane imports: it is pure data and validation.
Every error names the field it is about, so `progan` can print one line and exit 2 before writing anything.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

MIN_RESOLUTION = 8
MAX_RESOLUTION = 1024
MBSTD_GROUP = 4

# Global minibatch per resolution, from the reference code's single-GPU preset.
DEFAULT_MINIBATCH = {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4, 1024: 4}
# Learning rate per resolution, from the same preset ("preset-v2-1gpu": 0.001, 0.0015 at 1024²).
DEFAULT_LR = {4: 0.001, 8: 0.001, 16: 0.001, 32: 0.001, 64: 0.001, 128: 0.001, 256: 0.001, 512: 0.001, 1024: 0.0015}

# Upper bounds on sizes, so that a typo is refused at the boundary rather than found as an out-of-memory error
# (README, "The job spec"). Each is several times the reference code's largest value.
MAX_LATENT_SIZE = 4096
MAX_FMAP = 4096  # fmap_max; one 3x3 conv of 4096 -> 4096 maps is 151 M weights
MAX_FMAP_BASE = 65536
MAX_MINIBATCH = 4096  # global images per step
MAX_KIMG = 1_000_000.0  # a billion images per phase
MAX_EVAL_IMAGES = 16384  # the paper's SWD image count; per-phase SWD memory is flat in it, its time linear
MAX_SAMPLE_GRID = 16  # the grid is N² images at the phase's resolution: at 1024² a 16×16 grid is a 16384² PNG
# torch.manual_seed and numpy take seeds below 2**32 everywhere; the workers derive seed * 1000 + phase from it,
# which stays below torch's 2**64 limit.
MAX_SEED = 2**32 - 1
MAX_RETRY_SECONDS = 3600.0  # an outage longer than an hour is better ended and resumed
MAX_NONFINITE_STEPS = 10_000
MAX_ROLLBACKS = 100


@dataclass(frozen=True)
class Phase:
    """One phase of the growth schedule (service/schedule.py builds them); workers train one at a time."""

    index: int
    resolution: int
    kind: str  # "stable" or "fade"
    images: int  # global images to train, a whole number of global batches
    batch: int  # global minibatch
    lr: float
    workers: int | tuple[int, int]  # a fixed count, or an elastic (min, max) range

    @property
    def name(self) -> str:
        return f"{self.index:02d}-{self.resolution:04d}-{self.kind}"

    @property
    def fading(self) -> bool:
        return self.kind == "fade"

    @property
    def min_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        return max_workers(self.workers)

    @property
    def elastic(self) -> bool:
        return not isinstance(self.workers, int)

    @property
    def workers_text(self) -> str:
        return f"{self.min_workers}-{self.max_workers}" if self.elastic else str(self.workers)

    @property
    def batch_per_worker(self) -> int:
        """Per-rank batch with the most workers; a smaller elastic group splits the same global batch."""
        return self.batch // self.max_workers

    def alpha(self, images_seen: int) -> float:
        """Weight of the new layers: rises linearly over a fade phase, 1 in a stable phase."""
        if not self.fading or self.images == 0:
            return 1.0
        return min(1.0, images_seen / self.images)


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the field and the reason."""


def max_workers(workers: int | tuple[int, int]) -> int:
    """A `workers` value's largest group: the count itself, or the top of an elastic range."""
    return workers if isinstance(workers, int) else workers[1]


def resolutions_up_to(target: int) -> list[int]:
    """4, 8, … target."""
    return [2**k for k in range(2, int(math.log2(target)) + 1)]


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


BOTOCORE_RETRIES = {"mode": "standard", "total_max_attempts": 2}


class StorageOptions(BaseModel):
    """Where an S3-compatible server is; credentials come only from the environment or a mounted secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    retry_seconds: float = Field(default=120.0, ge=0, le=MAX_RETRY_SECONDS, description=(
        "how long a read or write keeps retrying while the store is unreachable (connection refused or reset, "
        "timeouts, 5xx) before the run fails; 0: no retries"))

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        """The spec is stored with the run and shown in ConfigMaps: a `user:pass@` URL would publish the secret."""
        if v is not None and "@" in urlsplit(v).netloc:
            raise ValueError("must not carry credentials (user:pass@); they come from AWS_* or a mounted secret")
        return v

    def fsspec_kwargs(self, url: str) -> dict:
        """s3fs's arguments. botocore's own retries are cut to one quick one (under a second): left at its default,
        one call that cannot connect spends 3 to 15 s in them before it fails, so `retry_seconds` (which
        `workers.storage.with_retries` keeps between calls) could run over by that much, or end with no try made
        after a store came back."""
        if not url.startswith("s3://"):
            return {}
        client_kwargs = {k: v for k, v in (("endpoint_url", self.endpoint_url), ("region_name", self.region)) if v}
        return {"client_kwargs": client_kwargs, "config_kwargs": {"retries": dict(BOTOCORE_RETRIES)}}


class EvalOptions(BaseModel):
    """What is measured at the end of each phase."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    swd_images: int = Field(default=256, ge=0, le=MAX_EVAL_IMAGES, description="images for the per-phase SWD; 0: off")
    sample_grid: int = Field(default=8, ge=1, le=MAX_SAMPLE_GRID, description="the sample grid is N×N")


PerResolution = dict[int, float]


class Spec(BaseModel):
    """One training run. Per-resolution tables take one value for every resolution or a {resolution: value} map
    whose missing resolutions take the default."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    run: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    dataset: str = Field(min_length=1)
    storage: str = Field(min_length=1)
    storage_options: StorageOptions = StorageOptions()

    resolution: int
    channels: Literal[1, 3] = 3
    latent_size: int = Field(default=512, ge=1, le=MAX_LATENT_SIZE)
    fmap_base: int = Field(default=8192, ge=1, le=MAX_FMAP_BASE)
    fmap_max: int = Field(default=512, ge=1, le=MAX_FMAP)
    loss: Literal["wgan-gp", "logistic-r1"] = "wgan-gp"
    gp_scale: Literal["reference", "local"] = Field(
        default="reference", description="penalise D's input gradient at the final resolution or the phase's own")
    mirror: bool = True

    minibatch: dict[int, int] = Field(default_factory=dict)
    lr: dict[int, float] = Field(default_factory=dict)
    fade_kimg: dict[int, float] = Field(default_factory=dict)
    stable_kimg: dict[int, float] = Field(default_factory=dict)
    workers: dict[int, int | tuple[int, int]] = Field(default_factory=dict)
    placement: Literal["pack", "spread"] = Field(
        default="pack", description="Ray Train's placement of a phase's workers: fill a node first, or one per node")
    total_kimg: float | None = Field(
        default=None, gt=0, description="images of the whole run; the final stable phase is extended to reach it")

    use_gpu: bool = False
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: forwards and backwards under bf16 autocast; weights, Adam, losses fp32")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    data_workers: int = Field(default=2, ge=0, description="DataLoader processes per training worker")
    checkpoint_kimg: float = Field(default=100.0, gt=0)
    max_failures: int = Field(default=3, ge=0)
    nonfinite_rollback_steps: int = Field(default=8, ge=1, le=MAX_NONFINITE_STEPS, description=(
        "this many non-finite steps in a row roll the phase back to its last good checkpoint"))
    max_rollbacks: int = Field(default=3, ge=0, le=MAX_ROLLBACKS, description=(
        "a phase that needs more rollbacks than this fails the run"))
    ema_beta: float = Field(default=0.999, ge=0, lt=1)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    metrics_port: int = Field(default=9400, ge=0, le=65535, description="0 picks a free port")
    metrics_host: str = Field(default="127.0.0.1", description="address the endpoint binds; 0.0.0.0 in a pod")
    metrics_linger_seconds: float = Field(default=30.0, ge=0, description="serve the final state this long")
    eval: EvalOptions = EvalOptions()

    @field_validator("resolution")
    @classmethod
    def _target_resolution(cls, v: int) -> int:
        if not is_power_of_two(v) or not MIN_RESOLUTION <= v <= MAX_RESOLUTION:
            raise ValueError(f"must be a power of two from {MIN_RESOLUTION} to {MAX_RESOLUTION}, got {v}")
        return v

    @field_validator("metrics_host")
    @classmethod
    def _ip_address(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"must be an IP address to bind, such as 127.0.0.1 or 0.0.0.0, got {v!r}") from None

    @field_validator("dataset", "storage")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else "file"
        if scheme not in ("file", "s3", "memory"):
            raise ValueError(f"unsupported URL scheme {scheme!r}; use a local path, file:// or s3://")
        return v.rstrip("/")

    @field_validator("minibatch", "lr", "fade_kimg", "stable_kimg", "workers", mode="before")
    @classmethod
    def _table(cls, v: object, info: ValidationInfo) -> object:
        """A scalar means "this value at every resolution"; the model validator fills it in."""
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        if isinstance(v, list) and info.field_name == "workers":  # [min, max] for every resolution
            v = {0: v}
        for key, value in (v.items() if isinstance(v, dict) else ()):
            if isinstance(value, list) and (len(value) != 2 or not all(isinstance(n, int) for n in value)):
                raise ValueError(f"an elastic range is [min, max] of two integers, got {value}"
                                 + (f" for {key}" if key else ""))
        return {0: v} if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _fill_tables(self) -> Spec:
        defaults = {"minibatch": DEFAULT_MINIBATCH, "lr": DEFAULT_LR, "fade_kimg": 600.0, "stable_kimg": 600.0, "workers": 1}
        resolutions = resolutions_up_to(self.resolution)
        for name, default in defaults.items():
            given: dict[int, float] = getattr(self, name)
            for res in given:
                if res != 0 and (not is_power_of_two(res) or not 4 <= res <= self.resolution):
                    raise ValueError(f"{name}: key {res} is not a resolution of this run (4…{self.resolution})")
            table = {}
            for res in resolutions:
                value = given.get(res, given.get(0, default[res] if isinstance(default, dict) else default))
                if name == "workers" and isinstance(value, tuple):
                    if not 1 <= value[0] <= value[1]:
                        raise ValueError(f"{name}[{res}]: an elastic range is [min, max] with 1 <= min <= max, "
                                         f"got {list(value)}")
                    table[res] = value if value[0] < value[1] else value[0]
                    continue
                if name in ("minibatch", "workers") and (value != int(value) or value < 1):
                    raise ValueError(f"{name}[{res}]: must be a positive integer, got {value}")
                if name == "minibatch" and value > MAX_MINIBATCH:
                    raise ValueError(f"{name}[{res}]: at most {MAX_MINIBATCH} images per step, got {value}")
                if name in ("lr",) and value <= 0:
                    raise ValueError(f"{name}[{res}]: must be positive, got {value}")
                if name in ("fade_kimg", "stable_kimg") and not 0 <= value <= MAX_KIMG:
                    raise ValueError(f"{name}[{res}]: must be from 0 to {MAX_KIMG:g}, got {value}")
                table[res] = type(default[4] if isinstance(default, dict) else default)(value)
            object.__setattr__(self, name, table)
        for res in resolutions:
            batch, workers = self.minibatch[res], self.workers[res]
            counts = range(workers[0], workers[1] + 1) if isinstance(workers, tuple) else [workers]
            given = list(workers) if isinstance(workers, tuple) else workers
            for count in counts:  # an elastic group keeps the global batch at every size it may shrink to
                if batch % count:
                    raise ValueError(f"minibatch[{res}]: {batch} is not divisible by {count} workers "
                                     f"(workers[{res}] = {given})")
                per_worker = batch // count
                if per_worker % min(MBSTD_GROUP, per_worker):
                    raise ValueError(
                        f"minibatch[{res}]: {per_worker} images per worker (with {count} of workers[{res}] = "
                        f"{given}) is not divisible by the minibatch-stddev group of {MBSTD_GROUP}"
                    )
        return self

    @model_validator(mode="after")
    def _fill_total_kimg(self) -> Spec:
        """Absent: the sum of the schedule. Given: at least that sum, as it only extends the final stable phase."""
        scheduled = math.fsum([*self.stable_kimg.values(), *(v for r, v in self.fade_kimg.items() if r > 4)])
        if self.total_kimg is None:
            object.__setattr__(self, "total_kimg", scheduled)
        elif self.total_kimg < scheduled - 1e-9:
            raise ValueError(f"total_kimg: {self.total_kimg:g} is less than the schedule's {scheduled:g} kimg "
                             f"(fade_kimg and stable_kimg summed); it can only extend the final stable phase")
        return self

    def channels_at(self, res: int) -> int:
        """Feature maps of the block at resolution res: min(fmap_base / 2^(log2 res - 1), fmap_max)."""
        return min(int(self.fmap_base / 2 ** (int(math.log2(res)) - 1)), self.fmap_max)

    @property
    def run_url(self) -> str:
        return f"{self.storage}/{self.run}"

    def model_hash(self) -> str:
        """Hash of what changes the model or the schedule; a resumed run must match it. Worker counts and the
        dataset URL are left out on purpose: a run may be resumed on more or fewer nodes, or a moved copy."""
        return hashlib.sha256(json.dumps(self.model_fields_that_matter(), sort_keys=True).encode()).hexdigest()[:16]

    def model_fields_that_matter(self) -> dict:
        keep = (
            "resolution channels latent_size fmap_base fmap_max loss gp_scale minibatch lr fade_kimg stable_kimg "
            "seed ema_beta mirror total_kimg"
        ).split()
        return json.loads(self.model_dump_json(include=set(keep)))

    def with_absolute_paths(self) -> Spec:
        """Local dataset and storage paths made absolute: Ray Train runs its workers in another directory."""
        local = {k: os.path.abspath(v.removeprefix("file://")) for k in ("dataset", "storage")
                 if "://" not in (v := getattr(self, k)) or v.startswith("file://")}
        return self.model_copy(update=local)

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)


def spec_differences(old: Spec, new: Spec) -> list[str]:
    """Lines 'field: old -> new' for every difference that changes the model or the schedule."""
    a, b = old.model_fields_that_matter(), new.model_fields_that_matter()
    return [f"{k}: {a[k]} -> {b[k]}" for k in a if a[k] != b[k]]


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{loc}: {msg}" if loc else msg  # a whole-spec check names its field in the message


def parse_spec(text: str, source: str = "spec") -> Spec:
    """YAML text -> Spec, or SpecError('<source>: <field>: <reason>')."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping of fields")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: {_format_error(e)}") from None


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec: {e.strerror}") from None
    return parse_spec(text, str(path))
