"""Metrics against established implementations: PSNR/SSIM vs scikit-image, the Frechet distance
vs an independent float64 eigendecomposition, IS vs the direct formula, codebook statistics vs
the quantizer's, streaming feature moments vs numpy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vqgan_jax import metrics
from vqgan_jax.models.quantizers import codebook_stats


def _image_pair(shape, noise):
    rng = np.random.default_rng(shape[1])
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.clip(x + noise * rng.standard_normal(shape), -1, 1).astype(np.float32)
    return x, y


@pytest.mark.parametrize("shape,noise", [((2, 32, 32, 3), 0.1), ((3, 48, 40, 3), 0.5)])
def test_psnr_ssim_match_skimage(shape, noise):
    x, y = _image_pair(shape, noise)
    ours_psnr = np.asarray(jax.jit(metrics.psnr)(x, y))
    ours_ssim = np.asarray(jax.jit(metrics.ssim)(x, y))
    a, b = (x + 1) / 2, (y + 1) / 2
    ref_psnr = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(shape[0])]
    ref_ssim = [structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1,
                                      gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False) for i in range(shape[0])]
    assert ours_psnr.shape == ours_ssim.shape == (shape[0],)
    np.testing.assert_allclose(ours_psnr, ref_psnr, rtol=1e-5)
    np.testing.assert_allclose(ours_ssim, ref_ssim, atol=1e-5)
    assert 0 < ours_ssim.min() and ours_ssim.max() < 1


def test_identical_images():
    x, _ = _image_pair((2, 16, 16, 3), 0.0)
    np.testing.assert_allclose(metrics.psnr(x, x), [metrics.PSNR_MAX_DB] * 2)
    np.testing.assert_allclose(metrics.ssim(x, x), [1.0, 1.0], atol=1e-6)


def test_quantize_to_uint8_levels():
    x = jnp.array([-1.5, -1.0, -0.0031, 0.0, 0.5, 1.0, 2.0])
    q = np.asarray(metrics.quantize_to_uint8_levels(x))
    u8 = np.round((q + 1) * 127.5)
    np.testing.assert_allclose(u8, [0, 0, 127, 128, 191, 255, 255])  # 127.1 -> 127, 127.5 -> 128
    np.testing.assert_allclose(q, u8 / 127.5 - 1, atol=1e-7)


def _pytorch_fid_frechet(mu1, s1, mu2, s2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance: scipy.linalg.sqrtm of sigma1 @ sigma2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_float64_sqrtm_reference():
    rng = np.random.default_rng(0)
    d = 32
    a = rng.standard_normal((500, d)) @ rng.standard_normal((d, d)) * 0.3
    b = rng.standard_normal((400, d)) * 1.5 + 0.7
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(fid, _pytorch_fid_frechet(mu1, s1, mu2, s2), rtol=1e-9)
    assert fid > 1
    # Closed form for commuting (diagonal) covariances: sum (sqrt(s1) - sqrt(s2))^2.
    d1, d2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(d1), mu1, np.diag(d2)),
                               np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2), rtol=1e-10)
    # float32 inputs are computed in float64 all the same.
    np.testing.assert_allclose(metrics.frechet_distance(*(np.float32(t) for t in (mu1, s1, mu2, s2))),
                               fid, rtol=1e-4)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    # Singular covariances (fewer samples than dimensions): ~0 for identical statistics, and
    # the same as sqrtm with pytorch-fid's eps fallback.
    few, other = a[:5], b[:7]
    sf, so = np.cov(few, rowvar=False), np.cov(other, rowvar=False)
    assert abs(metrics.frechet_distance(few.mean(0), sf, few.mean(0), sf)) < 1e-8
    np.testing.assert_allclose(metrics.frechet_distance(few.mean(0), sf, other.mean(0), so),
                               _pytorch_fid_frechet(few.mean(0), sf, other.mean(0), so), rtol=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1])


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((60, 7)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for splits in (1, 4):
        scores = []
        for part in np.array_split(probs, splits):  # 60 / 4: equal contiguous splits
            p_y = part.mean(0)
            scores.append(np.exp(np.mean([scipy.stats.entropy(p, p_y) for p in part])))
        mean, std = metrics.inception_score_from_probs(probs, splits)
        np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
    np.testing.assert_allclose(metrics.inception_score_from_probs(np.full((8, 5), 0.2), 1)[0], 1.0)
    np.testing.assert_allclose(metrics.inception_score_from_probs(np.eye(5), 1)[0], 5.0)
    with pytest.raises(ValueError, match="num_splits"):
        metrics.inception_score_from_probs(probs, 61)


def test_code_histogram_usage_perplexity():
    rng = np.random.default_rng(2)
    indices = jnp.asarray(rng.integers(0, 12, (4, 3, 5)), jnp.int32)
    counts = np.asarray(metrics.code_histogram(indices, 16))
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(indices).ravel(), minlength=16))
    perplexity, usage = codebook_stats(indices, 16)
    np.testing.assert_allclose(metrics.perplexity(counts), perplexity, rtol=1e-5)
    np.testing.assert_allclose(metrics.codebook_usage(counts), usage)
    masked = np.asarray(metrics.code_histogram(indices, 16, jnp.array([1, 0, 1, 0], bool)))
    np.testing.assert_array_equal(masked, np.bincount(np.asarray(indices)[::2].ravel(), minlength=16))
    assert metrics.perplexity(np.array([0, 5, 0, 5.0])) == pytest.approx(2.0)


def test_streaming_moments_match_numpy():
    rng = np.random.default_rng(3)
    feats = rng.uniform(0, 2, (37, 6)).astype(np.float32)
    stats = metrics.FeatureStats(dim=6)
    for x, mask in metrics.padded_batches([feats[:10, :, None, None], feats[10:, :, None, None]], 8):
        assert x.shape == (8, 6, 1, 1)
        stats.add_moments(*jax.jit(metrics.feature_moments)(x[:, :, 0, 0], mask))
    assert stats.count == 37
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats.astype(np.float64), rowvar=False),
                               atol=1e-5)


def test_padded_batches_converts_uint8():
    images = [np.full((3, 2, 2, 3), 255, np.uint8), np.zeros((2, 2, 2, 3), np.uint8)]
    batches = list(metrics.padded_batches(images, 4))
    assert [m.tolist() for _, m in batches] == [[True] * 4, [True, False, False, False]]
    np.testing.assert_allclose(batches[0][0][:, 0, 0, 0], [1, 1, 1, -1])
    np.testing.assert_allclose(batches[1][0][:, 0, 0, 0], [-1, 0, 0, 0])


def test_stats_round_trip_and_errors(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    path = str(tmp_path / "ref.npz")
    metrics.save_stats(path, mu, sigma, 7, {"split": "validation"})
    mu2, sigma2, protocol = metrics.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert protocol == {"split": "validation", "num_images": 7}
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's own format
    assert metrics.load_stats(str(tmp_path / "pytorch_fid.npz"))[2] == {}
    with pytest.raises(FileNotFoundError, match="--ref_stats=.*--write_ref_stats"):
        metrics.load_stats(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="--ref_stats=.*'sigma'"):
        metrics.load_stats(str(tmp_path / "bad.npz"))
    json.dumps(protocol)


def test_moments_stay_accurate_with_a_large_mean():
    """Features far from zero: float32 sums of squares would lose the variance; Chan's merge does not."""
    rng = np.random.default_rng(5)
    feats = (1000.0 + 0.01 * rng.standard_normal((64, 4))).astype(np.float32)
    stats = metrics.FeatureStats(dim=4)
    for i in range(0, 64, 8):
        stats.add_moments(*jax.device_get(metrics.feature_moments(feats[i:i + 8], np.ones(8, bool))))
    np.testing.assert_allclose(stats.sigma, np.cov(feats.astype(np.float64), rowvar=False),
                               rtol=1e-2, atol=1e-7)
