"""The UNet, classifier-free guidance, the classifier and the image metrics, without any checkpoint."""

import numpy as np
import pytest
import scipy.linalg
import torch

from scoreaction.image_metrics import diversity, frechet_distance_from_features, mean_pairwise_distance
from scoreaction.models import NetworkScore
from scoreaction.models.classifier import DigitClassifier
from scoreaction.models.unet import EMA, GuidedUNet, UNet, UNetConfig
from scoreaction.paths import make_path

SMALL = UNetConfig(base=8, mults=[1, 2], blocks=1, attention=[4], groups=4)


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the output convs start at zero), so tests see a non-trivial map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def test_unet_shapes_conditions_and_zero_start():
    net = UNet(SMALL)
    x, t = torch.randn(5, 1, 8, 8), torch.linspace(-5, 8, 5)
    assert torch.equal(net(x, t, torch.arange(5)), torch.zeros_like(x))  # zero-initialised output conv
    randomised(net)
    out = net(x, t, torch.arange(5))
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((5,), 10)))  # None is the null class
    assert not torch.allclose(net(x, t, torch.zeros(5, dtype=torch.long)), net(x, t, torch.ones(5, dtype=torch.long)))
    assert net(x, torch.tensor(0.3), torch.arange(5)).shape == x.shape  # one time for the whole batch


def test_unet_config_is_validated():
    with pytest.raises(ValueError, match="divisible by 2"):
        UNetConfig(image_size=6, mults=[1, 2, 2])
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(base=12, groups=8)
    with pytest.raises(ValueError, match="base"):
        UNetConfig(base=0)


def test_classifier_free_guidance_combines_conditional_and_null():
    net = randomised(UNet(SMALL)).double()
    x, t, c = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.rand(4, dtype=torch.float64), torch.tensor([0, 3, 9, 3])
    w = 1.5
    expected = (1 + w) * net(x, t, c) - w * net(x, t, torch.full_like(c, 10))
    torch.testing.assert_close(GuidedUNet(net, w)(x, t, c), expected)
    torch.testing.assert_close(GuidedUNet(net, 0.0)(x, t, c), net(x, t, c))
    torch.testing.assert_close(GuidedUNet(net, w)(x, t), net(x, t))  # unconditional: no guidance
    with pytest.raises(ValueError, match="guidance"):
        GuidedUNet(net, -1.0)


@pytest.mark.parametrize("cond", [torch.tensor([0, 10]), torch.tensor([-1, 2]), torch.tensor([0.0, 1.0]),
                                  torch.tensor([[0, 1]])])
def test_guided_unet_rejects_bad_conditions(cond):
    net = GuidedUNet(UNet(SMALL), 1.0)
    with pytest.raises(ValueError, match="class labels|integer tensor"):
        net(torch.randn(2, 1, 8, 8), torch.rand(2), cond)


def test_unet_plugs_into_network_score():
    path = make_path("vp")
    net = randomised(UNet(SMALL)).double()
    score = NetworkScore(GuidedUNet(net, 1.0), path, "eps", "log_snr")
    x, c, s = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3]), 0.4
    eps = GuidedUNet(net, 1.0)(x, path.log_snr(torch.full((3,), s, dtype=torch.float64)), c)
    torch.testing.assert_close(score(s, x, c), -eps / path.sigma(s))


def test_ema_is_the_moving_average_with_warmup():
    net = torch.nn.Linear(2, 1)
    w0 = net.weight.detach().clone()
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # decay min(0.5, (1 + 1) / (10 + 1))
    d = 2 / 11
    torch.testing.assert_close(ema.model.weight, d * w0 + (1 - d) * torch.ones(1, 2))
    ema.update(net)  # then min(0.5, 3 / 12)
    torch.testing.assert_close(ema.model.weight, 0.25 * (d * w0 + (1 - d)) + 0.75 * torch.ones(1, 2))
    assert not ema.model.weight.requires_grad


def test_classifier_shapes():
    clf = DigitClassifier()
    x = torch.randn(6, 1, 8, 8)
    assert clf(x).shape == (6, 10) and clf.features(x).shape == (6, 64)
    torch.testing.assert_close(clf.log_prob(x).exp().sum(-1), torch.ones(6))


def test_frechet_distance_matches_scipy_and_vanishes_on_identical_sets():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(400, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    h = torch.randn(300, 5, generator=g, dtype=torch.float64) + 0.5
    S1, S2 = np.cov(f.numpy().T), np.cov(h.numpy().T)
    covmean = scipy.linalg.sqrtm(S1 @ S2).real
    expected = float(((f.mean(0) - h.mean(0)) ** 2).sum()) + np.trace(S1 + S2 - 2 * covmean)
    assert frechet_distance_from_features(f, h) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    assert abs(frechet_distance_from_features(f, f)) < 1e-8
    with pytest.raises(ValueError, match="feature vectors"):
        frechet_distance_from_features(f, h[:, :3])


def test_diversity_measures():
    x = torch.zeros(3, 1, 2, 2)
    x[1, 0, 0, 0], x[2, 0, 0, 0] = 3.0, 4.0  # pairwise distances 3, 4, 1
    assert mean_pairwise_distance(x) == pytest.approx(8 / 3)
    clf = DigitClassifier()
    imgs, labels = torch.randn(20, 1, 8, 8), torch.arange(2).repeat(10)
    out = diversity(clf, imgs, labels)
    assert out["pixel_pairwise"] > 0 and out["feature_variance"] > 0
    copies = imgs[:2].repeat(10, 1, 1, 1)  # every class holds ten copies of one image: no diversity at all
    out = diversity(clf, copies, labels)
    assert out["pixel_pairwise"] == 0 and out["feature_variance"] == pytest.approx(0, abs=1e-10)
    half = diversity(clf, 0.5 * imgs, labels)["pixel_pairwise"]  # a distance: scales with the images
    assert half == pytest.approx(0.5 * diversity(clf, imgs, labels)["pixel_pairwise"], rel=1e-6)
    assert diversity(clf, imgs[:1].expand(4, -1, -1, -1), labels[:4] * 0)["pixel_pairwise"] == 0.0
