"""The FID Inception-v3: architecture (parameter count, shapes), the weights loader (.npz with
pytorch-fid's state_dict keys, errors), and the sharded Inception runs behind FID and IS,
all with random weights (nothing is downloaded)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import metrics, parallel
from vqgan_jax.models import inception

from conftest import random_inception_state_dict as random_state_dict


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.npz"
    np.savez(path, **random_state_dict())
    return str(path)


@pytest.fixture(scope="module")
def variables(weights_file):
    return inception.load_inception_params(weights_file)


@pytest.fixture(scope="module")
def apply_fn():
    return jax.jit(lambda v, x: inception.InceptionV3().apply(v, x))


def test_keys_and_parameter_count():
    state_dict = inception.to_state_dict(
        jax.tree.map(lambda a: np.zeros(a.shape, np.float32), inception.abstract_variables()))
    # 94 BasicConv2d (conv.weight, bn.weight/bias/running_mean/running_var) + fc weight/bias.
    assert len(state_dict) == 94 * 5 + 2
    for key, shape in [("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)),
                       ("Conv2d_1a_3x3.bn.running_mean", (32,)),
                       ("Mixed_5b.branch1x1.conv.weight", (64, 192, 1, 1)),
                       ("Mixed_5b.branch_pool.conv.weight", (32, 192, 1, 1)),
                       ("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 1, 7)),
                       ("Mixed_7c.branch3x3dbl_3b.conv.weight", (384, 384, 3, 1)),
                       ("fc.weight", (1008, 2048)), ("fc.bias", (1008,))]:
        assert state_dict[key].shape == shape, key
    trainable = sum(v.size for k, v in state_dict.items() if "running_" not in k)
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and
    # with 1008 instead of 1000 classes (+8 x 2049): pytorch-fid's FIDInceptionV3.
    assert trainable == 27_161_264 - 3_326_696 + 8 * 2049


def test_forward_shapes(variables, apply_fn):
    x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
    pool, logits = apply_fn(variables, x)
    assert pool.shape == (2, inception.FEATURE_DIM) and logits.shape == (2, inception.NUM_CLASSES)
    assert pool.dtype == logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and np.all(np.asarray(pool) >= 0)
    assert float(jnp.abs(pool[0] - pool[1]).max()) > 0  # the two images differ


def test_npz_round_trip(variables, weights_file, tmp_path):
    out = tmp_path / "again.npz"
    inception.save_inception_npz(variables, str(out))
    with np.load(out) as a, np.load(weights_file) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    assert variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"].shape == (192,)
    assert variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (1, 1, 2048, 192)


def test_loader_errors(tmp_path):
    state_dict = random_state_dict()
    with pytest.raises(FileNotFoundError, match="--inception_weights=.*pt_inception-2015-12-05"):
        inception.load_inception_params(str(tmp_path / "missing.npz"))
    missing = dict(state_dict)
    del missing["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    np.savez(tmp_path / "missing_key.npz", **missing)
    with pytest.raises(ValueError, match=r"--inception_weights.*'Mixed_6c\.branch7x7dbl_3\.bn\.running_var'"):
        inception.load_inception_params(str(tmp_path / "missing_key.npz"))
    bad = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    np.savez(tmp_path / "bad_shape.npz", **bad)
    with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"):
        inception.load_inception_params(str(tmp_path / "bad_shape.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="--inception_weights=.*not a readable"):
        inception.load_inception_params(str(tmp_path / "junk.npz"))
    extra = dict(state_dict, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64)})
    np.savez(tmp_path / "extra.npz", **extra)  # torch state_dicts carry these; ignored
    inception.load_inception_params(str(tmp_path / "extra.npz"))


def test_sharded_fid_and_is_match_direct(variables, apply_fn):
    """6 images through the 8-device mesh (one zero-padded, masked batch) vs a direct pass."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    x = images.astype(np.float32) / 127.5 - 1
    pools, logits = zip(*(jax.device_get(apply_fn(variables, x[i:i + 2])) for i in range(0, 6, 2)))
    logits = np.concatenate(logits)
    pools, probs = np.concatenate(pools), np.asarray(jax.nn.softmax(logits))
    mesh = parallel.create_mesh(-1, 1)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    # FID against the statistics of 3 of the images, vs a low-rank closed form: with
    # S = A^T A and R = B^T B (centred, scaled features), tr (S R)^1/2 = nuclear norm of A B^T.
    pools = pools.astype(np.float64)
    ref = pools[:3]
    a = (pools - pools.mean(0)) / np.sqrt(5)
    b = (ref - ref.mean(0)) / np.sqrt(2)
    expected = (np.sum((pools.mean(0) - ref.mean(0)) ** 2) + np.sum(a * a) + np.sum(b * b)
                - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())
    fid = metrics.fid_from_images([images], ref.mean(0), np.cov(ref, rowvar=False), variables,
                                  mesh=mesh, batch_size=8)
    assert fid > 0
    np.testing.assert_allclose(fid, expected, rtol=1e-3)
    # Padding rows that leaked into the statistics or the probabilities would change both.
    score, std = metrics.inception_score([images[:4], x[4:]], variables, mesh=mesh,
                                         batch_size=8, num_splits=2)
    expected_score, expected_std = metrics.inception_score_from_probs(probs, 2)
    assert score == pytest.approx(expected_score, rel=1e-3)
    # The std over the two splits is tiny (~1.3e-4: random weights give every image nearly the
    # same p(y|x)), so a relative tolerance on it only measures float32 rounding. Its bound:
    # std = |s_1 - s_2| / 2 is off by at most max_i |ds_i|, with s_i = exp(mean_x KL_x) and
    # KL_x = sum_c p_c log(p_c / pbar_c). Relative changes r_c of the p_c (|r_c| <= r) change
    # mean_x KL_x by mean_x sum_c p_c r_c log(p_c / pbar_c): the terms from the normalisations,
    # sum_c p_c r_c and sum_c pbar_c rbar_c, cancel over the split. So |ds_i| <= s_i r M_i,
    # M_i = mean_x sum_c p_c |log(p_c / pbar_c)| over split i (~0.07 here). p = softmax(logits):
    # r <= 2 max_c |d logit_c|. Both passes compute the logits in float32 but batch differently
    # (2 images on one device vs one on each of 8), so XLA rounds differently: at most
    # eps_f32 * max|logit| a layer over the 48 convolutions and fc of Inception's deepest path
    # (5 stem, 3 x 3 Mixed_5, 3 Mixed_6a, 4 x 5 Mixed_6b-e, 4 Mixed_7a, 2 x 3 Mixed_7b-c, fc).
    # About 2e-5 here, 15% of the std; measured differences are ~2e-7.
    p = np.maximum(probs.astype(np.float64), 1e-30)
    m = max(np.mean(np.sum(part * np.abs(np.log(part / part.mean(0))), axis=1))
            for part in (p[:3], p[3:]))
    r = 2 * 48 * np.finfo(np.float32).eps * np.abs(logits).max()
    assert 0 < expected_std and abs(std - expected_std) <= (expected_score + expected_std) * r * m


class Payload:
    """An arbitrary object: unpickling one runs code that the .pth loader must refuse."""


def test_pth_state_dict_loads_like_the_npz(variables, tmp_path):
    """The .pth path: a torch state_dict (as pytorch-fid's file) loads to the same variables;
    a pickle holding anything but tensors is refused by weights_only=True."""
    import torch

    state_dict = {k: torch.from_numpy(v) for k, v in random_state_dict().items()}
    state_dict["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(state_dict, tmp_path / "inception.pth")
    loaded = inception.load_inception_params(str(tmp_path / "inception.pth"))
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)

    torch.save({"fc.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="--inception_weights=.*weights_only=True"):
        inception.load_inception_params(str(tmp_path / "evil.pth"))


def _torch_fid_inception(sd, x):
    """pytorch-fid's FIDInceptionV3 forward written with torch.nn.functional on a state_dict:
    torch's own conv layouts, eval-mode BatchNorm, F.interpolate and count_include_pad=False."""
    import torch
    import torch.nn.functional as F

    def conv(name, x, stride=1, padding=0):
        x = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
        x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                         sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], training=False, eps=1e-3)
        return F.relu(x)

    avg = lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    cat = lambda *xs: torch.cat(xs, 1)

    def block_a(n, x):
        b5 = conv(f"{n}.branch5x5_2", conv(f"{n}.branch5x5_1", x), padding=2)
        bd = conv(f"{n}.branch3x3dbl_1", x)
        bd = conv(f"{n}.branch3x3dbl_3", conv(f"{n}.branch3x3dbl_2", bd, padding=1), padding=1)
        return cat(conv(f"{n}.branch1x1", x), b5, bd, conv(f"{n}.branch_pool", avg(x)))

    def block_c(n, x):
        b7 = conv(f"{n}.branch7x7_2", conv(f"{n}.branch7x7_1", x), padding=(0, 3))
        b7 = conv(f"{n}.branch7x7_3", b7, padding=(3, 0))
        bd = conv(f"{n}.branch7x7dbl_1", x)
        for i, p in ((2, (3, 0)), (3, (0, 3)), (4, (3, 0)), (5, (0, 3))):
            bd = conv(f"{n}.branch7x7dbl_{i}", bd, padding=p)
        return cat(conv(f"{n}.branch1x1", x), b7, bd, conv(f"{n}.branch_pool", avg(x)))

    def block_e(n, x, pool):
        b3 = conv(f"{n}.branch3x3_1", x)
        b3 = cat(conv(f"{n}.branch3x3_2a", b3, padding=(0, 1)),
                 conv(f"{n}.branch3x3_2b", b3, padding=(1, 0)))
        bd = conv(f"{n}.branch3x3dbl_2", conv(f"{n}.branch3x3dbl_1", x), padding=1)
        bd = cat(conv(f"{n}.branch3x3dbl_3a", bd, padding=(0, 1)),
                 conv(f"{n}.branch3x3dbl_3b", bd, padding=(1, 0)))
        pooled = avg(x) if pool == "avg" else F.max_pool2d(x, 3, 1, 1)
        return cat(conv(f"{n}.branch1x1", x), b3, bd, conv(f"{n}.branch_pool", pooled))

    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = conv("Conv2d_2b_3x3", conv("Conv2d_2a_3x3", conv("Conv2d_1a_3x3", x, 2)), padding=1)
    x = F.max_pool2d(conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", F.max_pool2d(x, 3, 2))), 3, 2)
    for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = block_a(n, x)
    bd = conv("Mixed_6a.branch3x3dbl_2", conv("Mixed_6a.branch3x3dbl_1", x), padding=1)
    x = cat(conv("Mixed_6a.branch3x3", x, 2), conv("Mixed_6a.branch3x3dbl_3", bd, 2),
            F.max_pool2d(x, 3, 2))
    for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = block_c(n, x)
    b7 = conv("Mixed_7a.branch7x7x3_2", conv("Mixed_7a.branch7x7x3_1", x), padding=(0, 3))
    b7 = conv("Mixed_7a.branch7x7x3_4", conv("Mixed_7a.branch7x7x3_3", b7, padding=(3, 0)), 2)
    x = cat(conv("Mixed_7a.branch3x3_2", conv("Mixed_7a.branch3x3_1", x), 2), b7,
            F.max_pool2d(x, 3, 2))
    x = block_e("Mixed_7c", block_e("Mixed_7b", x, "avg"), "max")
    pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return pool, F.linear(pool, sd["fc.weight"], sd["fc.bias"])


def test_matches_a_torch_forward_of_the_same_state_dict(variables, apply_fn):
    """Layouts, padding, BatchNorm, pooling and the resize agree with PyTorch's operators."""
    import torch

    sd = {k: torch.from_numpy(v) for k, v in random_state_dict().items()}
    x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
    pool, logits = jax.device_get(apply_fn(variables, x))
    with torch.no_grad():
        ref_pool, ref_logits = _torch_fid_inception(
            sd, torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
    scale = np.abs(ref_pool.numpy()).max()
    np.testing.assert_allclose(pool, ref_pool.numpy(), atol=1e-4 * scale, rtol=1e-4)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4 * np.abs(ref_logits.numpy()).max())
