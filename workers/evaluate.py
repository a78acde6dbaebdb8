"""Evaluation: sliced Wasserstein distance (SWD), MS-SSIM diversity, FID from user-supplied Inception, images.

Canonical image form for the metrics is what the reference metrics consume: uint8 NCHW in [0, 255], 1 or 3
channels. Generator output (float NCHW in [-1, 1]) is brought there by `quantize`, which rounds exactly as
the reference's adjust_dynamic_range + rint + clip does, so reals and fakes are compared on equal terms.

SWD follows the ProGAN paper (appendix D) and its reference metrics/sliced_wasserstein.py: a Laplacian
pyramid from the full resolution down to 16x16, 128 random 7x7 neighbourhoods per image and level,
descriptors normalised per channel over the whole set, and 4 repeats x 128 random directions; distances are
reported x1e3 per level and averaged. Everything is batched torch and runs where the images are.

MS-SSIM follows Wang et al. 2003 as the reference metrics/ms_ssim.py implements it (5 scales, 2x2 box
downsampling between scales, 'valid' Gaussian window). Images smaller than the 11-px window at coarse scales
get the window shrunk to the image size with sigma scaled alike, as that implementation does: at 32x32 the
scales are 32, 16, 8, 4, 2 with windows 11, 11, 8, 4, 2.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------
# Canonical image form


def quantize(images: Tensor) -> Tensor:
    """Float NCHW in [-1, 1] -> uint8 NCHW in [0, 255] on the same device (round half to even, clip)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _check_uint8(images: Tensor, what: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{what} takes uint8 NCHW images with 1 or 3 channels (see quantize), "
            f"got {images.dtype} of shape {tuple(images.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------
# SWD


_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _binomial_blur(x: Tensor, gain: float = 1.0) -> Tensor:
    """5x5 binomial filter ([1,4,6,4,1]/16 outer itself, times gain) with mirror padding, as cv2.pyrDown and
    the reference's scipy.ndimage.convolve(mode='mirror') do; applied separably to (B, 1, H, W)."""
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) * (math.sqrt(gain) / 16)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5))
    return F.conv2d(x, k.view(1, 1, 5, 1))


def _pyr_down(x: Tensor) -> Tensor:
    return _binomial_blur(x)[:, :, ::2, ::2]


def _pyr_up(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _binomial_blur(up, gain=4.0)


def laplacian_pyramid(images: Tensor, levels: int) -> list[Tensor]:
    """Float32 Laplacian pyramid of NCHW images, finest first; the last level is the Gaussian residual.

    Level i is G_i - pyr_up(G_{i+1}) with G_0 the images and G_{i+1} = pyr_down(G_i), so summing the
    levels back up (pyr_up then add, coarsest first) reconstructs the images.
    """
    n, c, h, w = images.shape
    g = images.float().reshape(n * c, 1, h, w)
    pyramid = []
    for _ in range(levels - 1):
        coarser = _pyr_down(g)
        pyramid.append(g - _pyr_up(coarser))
        g = coarser
    pyramid.append(g)
    return [p.reshape(n, c, p.shape[2], p.shape[3]) for p in pyramid]


def swd_resolutions(resolution: int) -> list[int]:
    """Pyramid levels SWD reports for images of this size: resolution, resolution/2, ..., 16."""
    if resolution < 16 or resolution & (resolution - 1):
        raise ValueError(f"SWD needs a power-of-two resolution >= 16, got {resolution}")
    return [resolution >> i for i in range(int(math.log2(resolution)) - 3)]


def patch_centers(seed: int, image_index: int, resolutions: list[int], patches: int, patch_size: int) -> Tensor:
    """(levels, patches, 2) int64 (y, x) neighbourhood centres for one image, inside the image at each level.

    They depend only on (seed, image index in its set), drawn level by level from
    numpy.random.default_rng([seed, image_index]).integers(r, size - r, (patches, 2)) with r = patch_size // 2,
    so the same images give the same descriptors however they are split into batches.
    """
    rng = np.random.default_rng([seed, image_index])
    r = patch_size // 2
    return torch.from_numpy(np.stack([rng.integers(r, s - r, size=(patches, 2)) for s in resolutions]))


def _extract_patches(level: Tensor, centers: Tensor, patch_size: int) -> Tensor:
    """(N, C, S, S) level, (N, P, 2) centres -> (N * P, C, k, k) neighbourhoods."""
    n, c = level.shape[:2]
    offsets = torch.arange(patch_size, device=level.device) - patch_size // 2
    ys = (centers[:, :, 0, None, None] + offsets[:, None]).expand(-1, -1, patch_size, patch_size)
    xs = (centers[:, :, 1, None, None] + offsets[None, :]).expand(-1, -1, patch_size, patch_size)
    idx = torch.arange(n, device=level.device).view(n, 1, 1, 1)
    patches = level.permute(0, 2, 3, 1)[idx, ys, xs]  # (N, P, k, k, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, c, patch_size, patch_size)


class SWDDescriptors:
    """Laplacian-pyramid neighbourhood descriptors of one image set, gathered batch by batch.

    Only descriptors are kept (patches * patch_size^2 * C floats per image and level), so a set of 16k
    images never sits in memory as images. `finish()` normalises each level's descriptors per channel over
    the whole set (mean 0, std 1, as the reference's finalize_descriptors) and returns them flattened.
    """

    def __init__(self, resolution: int, patches_per_image: int = 128, patch_size: int = 7, seed: int = 0):
        self.resolutions = swd_resolutions(resolution)
        if patch_size % 2 == 0 or patch_size > self.resolutions[-1]:
            raise ValueError(f"patch_size must be odd and at most {self.resolutions[-1]}, got {patch_size}")
        self.patches_per_image = patches_per_image
        self.patch_size = patch_size
        self.seed = seed
        self.count = 0
        self.channels: int | None = None
        self._parts: list[list[Tensor]] = [[] for _ in self.resolutions]
        self._finished: list[Tensor] | None = None

    def add(self, images: Tensor) -> None:
        """Take a batch of uint8 NCHW images at the full resolution; descriptors stay on their device."""
        _check_uint8(images, "SWDDescriptors.add")
        res = self.resolutions[0]
        if images.shape[2:] != (res, res):
            raise ValueError(f"SWD was set up for {res}x{res} images, got {tuple(images.shape[2:])}")
        if self.channels is not None and images.shape[1] != self.channels:
            raise ValueError(f"SWD set has {self.channels} channels, got a batch with {images.shape[1]}")
        if self._finished is not None:
            raise ValueError("SWDDescriptors.add after finish(): start a new set")
        self.channels = images.shape[1]
        n = images.shape[0]
        centers = torch.stack([
            patch_centers(self.seed, self.count + i, self.resolutions, self.patches_per_image, self.patch_size)
            for i in range(n)
        ]).to(images.device)  # (N, levels, P, 2)
        for lod, level in enumerate(laplacian_pyramid(images, len(self.resolutions))):
            self._parts[lod].append(_extract_patches(level, centers[:, lod], self.patch_size))
        self.count += n

    def finish(self) -> list[Tensor]:
        """Per level (finest first), the (images * patches, C * k * k) normalised descriptors."""
        if self._finished is None:
            if not self.count:
                raise ValueError("SWD set is empty: add images before finish()")
            self._finished = []
            for lod in range(len(self.resolutions)):
                desc = torch.cat(self._parts[lod])
                self._parts[lod] = []
                std, mean = torch.std_mean(desc, dim=(0, 2, 3), correction=0, keepdim=True)
                # A flat set (e.g. a collapsed generator) has no detail: keep its zeros instead of 0/0.
                desc = (desc - mean) / std.clamp_min(1e-8)
                self._finished.append(desc.reshape(desc.shape[0], -1))
        return self._finished


def _sort_rows(x: Tensor) -> Tensor:
    """Each row sorted ascending. On the CPU numpy's vectorised sort is several times faster than torch.sort
    (the same values come out), and sorting is most of the cost of SWD."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


def sliced_wasserstein(
    a: list[Tensor], b: list[Tensor], dirs: int = 128, repeats: int = 4, seed: int = 0
) -> list[float]:
    """Per level, the sliced Wasserstein distance between descriptor sets a and b, times 1e3.

    For each level, then each repeat, directions are torch.randn(D, dirs, dtype=float64) from one CPU
    torch.Generator seeded with seed, normalised to unit length and cast to float32; both sets are projected,
    the projections sorted per direction, and the mean absolute difference taken (both sets must hold the
    same number of descriptors, as in the reference).
    """
    if len(a) != len(b):
        raise ValueError(f"descriptor sets have {len(a)} and {len(b)} levels")
    gen = torch.Generator().manual_seed(seed)
    result = []
    for da, db in zip(a, b):
        if da.shape != db.shape:
            raise ValueError(f"descriptor sets differ in shape: {tuple(da.shape)} vs {tuple(db.shape)}")
        m = da.shape[0]
        chunk = max(1, min(dirs, (1 << 26) // m))  # bounds the (m, chunk) projections that sort holds at once
        total = 0.0
        for _ in range(repeats):
            d = torch.randn(da.shape[1], dirs, dtype=torch.float64, generator=gen)
            d = (d / d.norm(dim=0, keepdim=True)).float().T.to(da.device)
            for j in range(0, dirs, chunk):  # (directions, descriptors) keeps each sort contiguous
                pa = _sort_rows(d[j : j + chunk] @ da.T)
                pb = _sort_rows(d[j : j + chunk] @ db.T)
                total += (pa - pb).abs().sum(dtype=torch.float64).item()
        result.append(total / (m * dirs * repeats) * 1e3)
    return result


def swd_between(
    real: SWDDescriptors, fake: SWDDescriptors, dirs: int = 128, repeats: int = 4, seed: int = 0
) -> dict:
    """{"levels": {resolution: SWD x1e3}, "avg": mean over levels} for two gathered sets."""
    if real.resolutions != fake.resolutions:
        raise ValueError(f"SWD sets have different pyramids: {real.resolutions} vs {fake.resolutions}")
    dists = sliced_wasserstein(real.finish(), fake.finish(), dirs=dirs, repeats=repeats, seed=seed)
    return {"levels": dict(zip(real.resolutions, dists)), "avg": float(np.mean(dists))}


def swd(reals: Tensor, fakes: Tensor, seed: int = 0, patches_per_image: int = 128, batch: int = 256,
        dirs: int = 128, repeats: int = 4) -> dict:
    """SWD between two uint8 NCHW image tensors of equal count; see swd_between for the result."""
    _check_uint8(reals, "swd")
    sets = []
    for images in (reals, fakes):
        desc = SWDDescriptors(reals.shape[-1], patches_per_image=patches_per_image, seed=seed)
        for i in range(0, images.shape[0], batch):
            desc.add(images[i : i + batch])
        sets.append(desc)
    return swd_between(*sets, dirs=dirs, repeats=repeats, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# MS-SSIM


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    """1-D factor of MATLAB's fspecial('gaussian', size, sigma); even sizes are centred between pixels."""
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_cs(x: Tensor, y: Tensor, data_range: float, k1: float, k2: float) -> tuple[Tensor, Tensor]:
    """Per-image mean SSIM and contrast-structure terms at one scale, 'valid' window shrunk to fit."""
    n, c, h, w = x.shape
    size = min(11, h, w)
    g = _gaussian_window(size, size * 1.5 / 11, x.device)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1).reshape(n * 5 * c, 1, h, w)
    stats = F.conv2d(F.conv2d(stack, g.view(1, 1, 1, size)), g.view(1, 1, size, 1))
    mu1, mu2, e11, e22, e12 = stats.reshape(n, 5, c, *stats.shape[2:]).unbind(1)
    s11, s22, s12 = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    v1, v2 = 2 * s12 + c2, s11 + s22 + c2
    ssim = ((2 * mu1 * mu2 + c1) * v1) / ((mu1 * mu1 + mu2 * mu2 + c1) * v2)
    return ssim.mean(dim=(1, 2, 3)), (v1 / v2).mean(dim=(1, 2, 3))


def ms_ssim(
    a: Tensor,
    b: Tensor,
    data_range: float = 255.0,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """(N,) MS-SSIM of image pairs (a[i], b[i]), NCHW of any dtype with values in [0, data_range].

    The luminance term compares absolute means, so values must start at 0: quantize [-1, 1] images first.

    Per scale the SSIM and contrast-structure terms are clipped at 0 (as the reference does, to keep the
    fractional powers real); the result is prod(cs_s ^ w_s for the first scales) * ssim_last ^ w_last.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ms_ssim takes two NCHW batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[2:]) < 2 ** (len(weights) - 1):
        raise ValueError(f"ms_ssim with {len(weights)} scales needs images of at least {2 ** (len(weights) - 1)} px")
    x, y = a.float(), b.float()
    result = torch.ones(a.shape[0], device=a.device)
    for weight in weights[:-1]:
        result = result * _ssim_cs(x, y, data_range, k1, k2)[1].clamp_min(0) ** weight
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result * _ssim_cs(x, y, data_range, k1, k2)[0].clamp_min(0) ** weights[-1]


def diversity_ms_ssim(
    images: Tensor, pairs: int, seed: int = 0, data_range: float = 255.0, batch: int = 256
) -> float:
    """Mean MS-SSIM over random pairs of different images (the paper's diversity measure: lower is more varied).

    Pairs (i, j), i != j, come from a CPU torch.Generator seeded with seed, so the value is reproducible.
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"diversity_ms_ssim needs at least 2 images, got {n}")
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (pairs,), generator=gen)
    second = (first + torch.randint(1, n, (pairs,), generator=gen)) % n
    total = 0.0
    for k in range(0, pairs, batch):
        i, j = first[k : k + batch].to(images.device), second[k : k + batch].to(images.device)
        total += ms_ssim(images[i], images[j], data_range=data_range).double().sum().item()
    return total / pairs


# ----------------------------------------------------------------------------------------------------------
# FID (only with an Inception network the user supplies; nothing is downloaded)


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load a user-supplied TorchScript Inception feature extractor, e.g. NVlabs' inception-2015-12-05.pt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Inception weights file not found: {path} (FID needs a TorchScript file; none is downloaded)")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(f"{path} is not a TorchScript module: {e}") from e


@torch.no_grad()
def inception_features(net: torch.jit.ScriptModule, images: Tensor) -> Tensor:
    """(N, D) float64 features of uint8 NCHW images; grayscale is repeated to RGB.

    The calling convention is that of NVlabs' TorchScript detector: net(uint8 NCHW [0, 255], return_features=True).
    """
    _check_uint8(images, "inception_features")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return net(images, return_features=True).double()


class FeatureStats:
    """Running mean and covariance of feature vectors (float64 sums), so features need not be kept."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: Tensor | None = None
        self._outer: Tensor | None = None

    def add(self, features: Tensor) -> None:
        f = features.double().reshape(features.shape[0], -1)
        if self._sum is None:
            self._sum, self._outer = f.sum(0), f.T @ f
        else:
            self._sum += f.sum(0)
            self._outer += f.T @ f
        self.count += f.shape[0]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased covariance, as numpy.cov(features, rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"feature statistics need at least 2 samples, got {self.count}")
        mu = self._sum / self.count
        sigma = (self._outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_features(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    tr((S1 S2)^(1/2)) is computed as the trace of the square root of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2), which has the same eigenvalues and avoids complex parts from a non-symmetric sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (mu1.size,) * 2 or sigma2.shape != sigma1.shape:
        raise ValueError(f"FID statistics disagree in shape: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    root1 = _sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------------------
# Images for sample grids and interpolations


def to_uint8(images: Tensor) -> np.ndarray:
    """Float NCHW in [-1, 1] -> uint8 NHWC numpy array on the CPU."""
    return quantize(images).permute(0, 2, 3, 1).cpu().numpy()


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def image_grid(images: Tensor, rows: int) -> Image.Image:
    """Float NCHW [-1, 1] (or quantized uint8) images tiled row by row into `rows` rows (empty cells black); L or
    RGB image."""
    n, c, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy() if images.dtype == torch.uint8 else to_uint8(images)
    for k, img in enumerate(pixels):
        r, q = divmod(k, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return _pil(grid)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_gif(frames: Tensor, duration_ms: int = 80) -> bytes:
    """Looping GIF of float NCHW [-1, 1] frames. Pillow merges consecutive identical frames into one."""
    pics = [_pil(f) for f in to_uint8(frames)]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def save_strip_and_gif(frames: Tensor, png_path: str | Path, gif_path: str | Path, duration_ms: int = 80) -> None:
    """Write frames as a one-row PNG strip and as an animated GIF (local paths; use the encoders for storage)."""
    Path(png_path).write_bytes(encode_png(image_grid(frames, rows=1)))
    Path(gif_path).write_bytes(encode_gif(frames, duration_ms))


def slerp(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """Spherical interpolation between latents a and b (..., D); t broadcasts against a[..., :1].

    Pixel-normalised latents lie near a sphere, where a straight lerp cuts through the low-density interior.
    Nearly parallel pairs fall back to lerp, where the spherical weights are 0/0.
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    cos = F.cosine_similarity(a, b, dim=-1).unsqueeze(-1).clamp(-1, 1)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin
    return torch.where(sin > 1e-6, spherical, torch.lerp(a, b, t))
