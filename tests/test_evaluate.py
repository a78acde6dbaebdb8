"""Evaluation metrics against slow references written here, known closed forms, and real Fashion-MNIST images.

The Inception network itself is not tested (no weights are available offline); its loader and calling
convention are exercised with a small TorchScript module saved to disk.
"""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from workers.evaluate import (
    FeatureStats,
    SWDDescriptors,
    diversity_ms_ssim,
    fid_from_features,
    image_grid,
    inception_features,
    laplacian_pyramid,
    load_inception,
    ms_ssim,
    patch_centers,
    quantize,
    save_strip_and_gif,
    slerp,
    sliced_wasserstein,
    swd,
    swd_resolutions,
    to_uint8,
)


@pytest.fixture(scope="module")
def fmnist(fashion_mnist) -> torch.Tensor:
    """The first 256 Fashion-MNIST test images, zero-padded to 32x32: uint8 (256, 1, 32, 32)."""
    with gzip.open(fashion_mnist / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)[: 256 * 784]
    return F.pad(torch.from_numpy(raw.reshape(256, 1, 28, 28).copy()), (2, 2, 2, 2))


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    r = math.ceil(3 * sigma)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    n, c, h, w = images.shape
    y = F.pad(images.float().reshape(n * c, 1, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.round().clamp(0, 255).to(torch.uint8).reshape(n, c, h, w)


# ----------------------------------------------------------------------------------------------------------
# Slow SWD reference: numpy, explicit loops, the reference code's steps one by one

KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


def slow_convolve_mirror(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    h, w = img.shape
    padded = np.pad(img, 2, mode="reflect")  # (d c b | a b c d | c b a), scipy's 'mirror'
    out = np.zeros_like(img)
    for dy in range(5):
        for dx in range(5):
            out += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return out


def slow_pyr_down(img: np.ndarray) -> np.ndarray:
    return slow_convolve_mirror(img, KERNEL)[::2, ::2]


def slow_pyr_up(img: np.ndarray) -> np.ndarray:
    up = np.zeros((img.shape[0] * 2, img.shape[1] * 2))
    up[::2, ::2] = img
    return slow_convolve_mirror(up, KERNEL * 4)


def slow_pyramid(img: np.ndarray, levels: int) -> list[np.ndarray]:
    gauss = [img.astype(np.float64)]
    for _ in range(levels - 1):
        gauss.append(slow_pyr_down(gauss[-1]))
    return [gauss[i] - slow_pyr_up(gauss[i + 1]) for i in range(levels - 1)] + [gauss[-1]]


def slow_descriptors(images: np.ndarray, resolutions, patches: int, seed: int) -> list[np.ndarray]:
    n, c = images.shape[:2]
    per_level = [[] for _ in resolutions]
    for i in range(n):
        pyramids = [slow_pyramid(images[i, ch], len(resolutions)) for ch in range(c)]
        centers = patch_centers(seed, i, resolutions, patches, 7).numpy()
        for lod in range(len(resolutions)):
            for y, x in centers[lod]:
                patch = np.stack([pyramids[ch][lod][y - 3 : y + 4, x - 3 : x + 4] for ch in range(c)])
                per_level[lod].append(patch)
    out = []
    for desc in per_level:
        desc = np.stack(desc)
        desc = (desc - desc.mean(axis=(0, 2, 3), keepdims=True)) / desc.std(axis=(0, 2, 3), keepdims=True)
        out.append(desc.reshape(len(desc), -1))
    return out


def slow_sliced_wasserstein(a, b, dirs: int, repeats: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    result = []
    for da, db in zip(a, b):
        per_repeat = []
        for _ in range(repeats):
            d = torch.randn(da.shape[1], dirs, dtype=torch.float64, generator=gen).numpy()
            d = d / np.sqrt((d**2).sum(axis=0, keepdims=True))
            dists = []
            for k in range(dirs):
                pa, pb = np.sort(da @ d[:, k]), np.sort(db @ d[:, k])
                dists.append(np.mean(np.abs(pa - pb)))
            per_repeat.append(np.mean(dists))
        result.append(np.mean(per_repeat) * 1e3)
    return result


# ----------------------------------------------------------------------------------------------------------
# SWD


def test_swd_levels_follow_resolution():
    assert swd_resolutions(16) == [16]
    assert swd_resolutions(32) == [32, 16]
    assert swd_resolutions(128) == [128, 64, 32, 16]
    with pytest.raises(ValueError, match="resolution >= 16"):
        swd_resolutions(8)


def test_laplacian_pyramid_matches_slow_pyramid_and_reconstructs():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fast = laplacian_pyramid(images, 3)
    assert [tuple(p.shape) for p in fast] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    for n in range(2):
        for c in range(3):
            slow = slow_pyramid(images[n, c].numpy(), 3)
            for lod in range(3):
                np.testing.assert_allclose(fast[lod][n, c].numpy(), slow[lod], atol=1e-3)
            rebuilt = slow[2]
            for level in slow[1::-1]:
                rebuilt = slow_pyr_up(rebuilt) + level
            np.testing.assert_allclose(rebuilt, images[n, c].numpy(), atol=1e-9)


def test_swd_matches_slow_reference():
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen)
    b = gaussian_blur(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen), 1.0)
    patches, dirs, repeats, seed = 6, 8, 3, 5

    sets = []
    for images in (a, b):
        desc = SWDDescriptors(32, patches_per_image=patches, seed=seed)
        desc.add(images[:1])  # split batches must not change the sampled neighbourhoods
        desc.add(images[1:])
        sets.append(desc.finish())
    slow_sets = [slow_descriptors(x.numpy(), [32, 16], patches, seed) for x in (a, b)]
    for fast, slow in zip(sets, slow_sets):
        for lod in range(2):
            assert fast[lod].shape == (3 * patches, 3 * 49)
            np.testing.assert_allclose(fast[lod].numpy(), slow[lod], atol=1e-4)

    fast = sliced_wasserstein(*sets, dirs=dirs, repeats=repeats, seed=seed)
    slow = slow_sliced_wasserstein(*slow_sets, dirs=dirs, repeats=repeats, seed=seed)
    assert fast[0] > 10 and fast[1] > 10
    np.testing.assert_allclose(fast, slow, rtol=1e-4)


def test_swd_zero_against_itself_and_deterministic(fmnist):
    a, b = fmnist[:64], fmnist[64:128]
    same = swd(a, a, seed=3, patches_per_image=32)
    assert same["levels"] == {32: 0.0, 16: 0.0} and same["avg"] == 0.0

    first = swd(a, b, seed=3, patches_per_image=32)
    assert first == swd(a, b, seed=3, patches_per_image=32)
    assert first != swd(a, b, seed=4, patches_per_image=32)
    assert first["avg"] == pytest.approx(np.mean(list(first["levels"].values())))


def test_swd_grows_with_blur_and_noise(fmnist):
    a = fmnist[:64]
    blurred = [swd(a, gaussian_blur(a, s), patches_per_image=32)["avg"] for s in (0.5, 1.0, 2.0)]
    assert 1.0 < blurred[0] < blurred[1] < blurred[2], blurred

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(a.shape, generator=gen)
    noisy = [swd(a, (a + s * noise).round().clamp(0, 255).to(torch.uint8), patches_per_image=32)["avg"]
             for s in (4.0, 16.0, 64.0)]
    assert 1.0 < noisy[0] < noisy[1] < noisy[2], noisy


def test_swd_ignores_global_brightness_offset_like_the_reference(fmnist):
    """Each set is normalised by its own per-channel mean and std, so an unclipped offset vanishes."""
    a = (fmnist[:32].float() * 0.75).round().to(torch.uint8)
    assert swd(a, a + 40, patches_per_image=32)["avg"] < 1e-3


def test_swd_rgb_and_validation():
    gen = torch.Generator().manual_seed(6)
    rgb = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen)
    result = swd(rgb, gaussian_blur(rgb, 1.0), patches_per_image=16)
    assert list(result["levels"]) == [16] and result["avg"] > 1.0

    desc = SWDDescriptors(16)
    with pytest.raises(ValueError, match="uint8 NCHW"):
        desc.add(rgb.float())
    with pytest.raises(ValueError, match="32x32"):
        SWDDescriptors(32).add(rgb)
    desc.add(rgb)
    with pytest.raises(ValueError, match="3 channels"):
        desc.add(rgb[:, :1])


# ----------------------------------------------------------------------------------------------------------
# MS-SSIM


def slow_ms_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """One pair (C, H, W) through Wang's MS-SSIM with loops, the window shrunk to fit as the reference does."""
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = a.astype(np.float64), b.astype(np.float64)
    values = []
    for s in range(5):
        size = min(11, x.shape[1], x.shape[2])
        sigma = size * 1.5 / 11
        coords = np.arange(size) - (size - 1) / 2
        window = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
        window /= window.sum()
        ssims, css = [], []
        for ch in range(x.shape[0]):
            for i in range(x.shape[1] - size + 1):
                for j in range(x.shape[2] - size + 1):
                    px, py = x[ch, i : i + size, j : j + size], y[ch, i : i + size, j : j + size]
                    mx, my = (window * px).sum(), (window * py).sum()
                    vx = (window * px * px).sum() - mx * mx
                    vy = (window * py * py).sum() - my * my
                    cxy = (window * px * py).sum() - mx * my
                    cs = (2 * cxy + c2) / (vx + vy + c2)
                    ssims.append((2 * mx * my + c1) / (mx * mx + my * my + c1) * cs)
                    css.append(cs)
        values.append(max(np.mean(css), 0.0) ** weights[s] if s < 4 else max(np.mean(ssims), 0.0) ** weights[s])
        x = (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4
        y = (y[:, 0::2, 0::2] + y[:, 1::2, 0::2] + y[:, 0::2, 1::2] + y[:, 1::2, 1::2]) / 4
    return float(np.prod(values))


def test_ms_ssim_matches_slow_reference(fmnist):
    a, b = fmnist[:2], gaussian_blur(fmnist[:2], 0.7)
    fast = ms_ssim(a, b)
    slow = [slow_ms_ssim(a[i].numpy(), b[i].numpy()) for i in range(2)]
    assert all(0.3 < s < 0.999 for s in slow), slow
    np.testing.assert_allclose(fast.numpy(), slow, rtol=1e-4)


def test_ms_ssim_identical_is_one_and_noise_near_zero():
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=gen)
    np.testing.assert_allclose(ms_ssim(x, x).numpy(), 1.0, atol=1e-6)
    assert ms_ssim(x, y).mean().item() < 0.1

    small = (x.float() + 8 * torch.randn(x.shape, generator=gen)).clamp(0, 255)
    large = (x.float() + 32 * torch.randn(x.shape, generator=gen)).clamp(0, 255)
    assert ms_ssim(x, large).mean() < ms_ssim(x, small).mean() < 1.0

    # values in [0, data_range]: the same images in [0, 1] give the same score with data_range 1
    np.testing.assert_allclose(ms_ssim(x.float() / 255, small / 255, data_range=1.0).numpy(),
                               ms_ssim(x, small).numpy(), rtol=1e-4)
    with pytest.raises(ValueError, match="at least 16 px"):
        ms_ssim(x[:, :, :8, :8], x[:, :, :8, :8])


def test_diversity_ms_ssim(fmnist):
    varied = diversity_ms_ssim(fmnist[:64], pairs=64, seed=1)
    assert varied == diversity_ms_ssim(fmnist[:64], pairs=64, seed=1)
    assert varied != diversity_ms_ssim(fmnist[:64], pairs=64, seed=2)
    collapsed = fmnist[:1].expand(64, -1, -1, -1)
    assert diversity_ms_ssim(collapsed, pairs=64, seed=1) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < varied < 0.6
    with pytest.raises(ValueError, match="at least 2 images"):
        diversity_ms_ssim(fmnist[:1], pairs=4)


# ----------------------------------------------------------------------------------------------------------
# FID


def test_fid_identical_is_zero_and_diagonal_closed_form():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    sigma = m @ m.T + np.eye(6)
    mu = rng.normal(size=6)
    assert abs(fid_from_features(mu, sigma, mu, sigma)) < 1e-8

    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # 5 + 1 + 1 + 4
    assert fid_from_features(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_non_commuting_2x2_closed_form():
    """For 2x2 PSD matrices tr((S1 S2)^(1/2)) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))."""
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 0.0])
    tr_root = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 1.25 + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert fid_from_features(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="shape"):
        fid_from_features(mu1, s1, np.zeros(3), np.eye(3))


def test_feature_stats_match_numpy():
    features = torch.randn(50, 5, generator=torch.Generator().manual_seed(8)) * 3 + 1
    stats = FeatureStats()
    for chunk in features.split(16):
        stats.add(chunk)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, features.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-10)


class StandInDetector(torch.nn.Module):
    """Not Inception: a TorchScript module with the NVlabs detector's signature, to test loading and calling."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.float()
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def test_load_inception_and_features(tmp_path):
    missing = tmp_path / "inception.pt"
    with pytest.raises(ValueError, match=str(missing)):
        load_inception(missing)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt is not a TorchScript module"):
        load_inception(tmp_path / "junk.pt")

    torch.jit.script(StandInDetector()).save(str(missing))
    net = load_inception(missing)
    gray = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    features = inception_features(net, gray)
    assert features.shape == (4, 6) and features.dtype == torch.float64
    np.testing.assert_allclose(features[:, 3:].numpy(), gray.amax(dim=(2, 3)).repeat(1, 3).numpy())


# ----------------------------------------------------------------------------------------------------------
# Images


def test_quantize_and_to_uint8():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert quantize(x).flatten().tolist() == [0, 0, 128, 255, 255]
    rgb = torch.rand(2, 3, 4, 5) * 2 - 1
    out = to_uint8(rgb)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert np.array_equal(out, quantize(rgb).permute(0, 2, 3, 1).numpy())


def test_image_grid_layout(tmp_path):
    images = torch.rand(5, 3, 8, 6, generator=torch.Generator().manual_seed(10)) * 2 - 1
    grid = image_grid(images, rows=2)
    grid.save(tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as opened:
        assert opened.size == (18, 16) and opened.mode == "RGB"
        pixels = np.asarray(opened)
    assert np.array_equal(pixels[8:16, 6:12], to_uint8(images[4:5])[0])
    assert not pixels[8:16, 12:18].any()
    assert image_grid(images[:, :1], rows=1).mode == "L"


def test_save_strip_and_gif(tmp_path):
    z0, z1 = torch.randn(2, 16, generator=torch.Generator().manual_seed(11))
    weights = torch.linspace(0, 1, 7).view(7, 1, 1, 1)
    frames = (torch.lerp(-torch.ones(1, 1, 8, 8), torch.ones(1, 1, 8, 8), weights)
              + 0.01 * slerp(z0, z1, torch.linspace(0, 1, 7)[:, None]).view(7, 1, 4, 4).repeat(1, 1, 2, 2))
    save_strip_and_gif(frames, tmp_path / "strip.png", tmp_path / "anim.gif")
    with Image.open(tmp_path / "strip.png") as strip:
        assert strip.size == (7 * 8, 8)
    with Image.open(tmp_path / "anim.gif") as gif:
        assert gif.n_frames == 7 and gif.size == (8, 8)
        gif.seek(6)
        assert np.array_equal(np.asarray(gif.convert("L")), to_uint8(frames[6:])[0, :, :, 0])


def test_slerp():
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)
    b = b * (a.norm(dim=-1, keepdim=True) / b.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    path = slerp(a, b, torch.linspace(0, 1, 9).view(9, 1, 1))
    assert path.shape == (9, 3, 32)
    torch.testing.assert_close(path.norm(dim=-1), a.norm(dim=-1).expand(9, -1))
    assert torch.all(path[4].norm(dim=-1) > torch.lerp(a, b, 0.5).norm(dim=-1))
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)
