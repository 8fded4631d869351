"""Metrics of image samples through the project's digit classifier: class accuracy, Frechet distance in
its feature space (with the real-vs-real floor), and diversity per class.

Frechet distance (Heusel et al. 2017, "FID" with our classifier instead of Inception):
    FD(X, Y) = || mu_X - mu_Y ||^2 + tr( S_X + S_Y - 2 (S_X^{1/2} S_Y S_X^{1/2})^{1/2} ),
with (mu, S) the mean and covariance of the feature vectors. It is biased upwards at finite n, so it
is only meaningful next to its floor: FD between two disjoint sets of REAL images of the same size.
"""

from __future__ import annotations

import torch

from scoreaction.models.classifier import DigitClassifier


def _features(classifier: DigitClassifier, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        p = next(classifier.parameters())
        return torch.cat([classifier.features(x.to(p)) for x in images.split(batch)]).double()


def _sqrtm_psd(S: torch.Tensor) -> torch.Tensor:
    lam, V = torch.linalg.eigh(0.5 * (S + S.T))
    return (V * lam.clamp(min=0).sqrt()) @ V.T


def frechet_distance_from_features(f: torch.Tensor, g: torch.Tensor) -> float:
    """FD between two sets of feature vectors (n, d) and (m, d), float64."""
    if f.ndim != 2 or g.ndim != 2 or f.shape[1] != g.shape[1] or min(len(f), len(g)) < 2:
        raise ValueError(f"Frechet distance needs two sets of >= 2 feature vectors of equal width, found shapes "
                         f"{tuple(f.shape)} and {tuple(g.shape)}")
    f, g = f.double(), g.double()
    mu_f, mu_g = f.mean(0), g.mean(0)
    S_f, S_g = torch.cov(f.T), torch.cov(g.T)
    root = _sqrtm_psd(S_f)
    cross = _sqrtm_psd(root @ S_g @ root)
    return float(((mu_f - mu_g) ** 2).sum() + torch.trace(S_f) + torch.trace(S_g) - 2 * torch.trace(cross))


def frechet_distance(classifier: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """FD between two image sets (B, 1, H, W) in the classifier's feature space."""
    return frechet_distance_from_features(_features(classifier, x), _features(classifier, y))


def class_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fraction of images the classifier assigns to their asked class: overall and per class."""
    with torch.no_grad():
        p = next(classifier.parameters())
        pred = torch.cat([classifier(x.to(p)).argmax(-1) for x in images.split(1024)])
    labels = labels.to(pred.device)
    hit = (pred == labels).double()
    per_class = {int(c): float(hit[labels == c].mean()) for c in labels.unique()}
    return {"accuracy": float(hit.mean()), "per_class": per_class}


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance between distinct pairs of samples (flattened), float64."""
    x = x.reshape(len(x), -1).double()
    if len(x) < 2:
        raise ValueError(f"diversity needs at least 2 samples, found {len(x)}")
    d = torch.cdist(x, x)
    return float(d.sum() / (len(x) * (len(x) - 1)))


def diversity(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-class diversity, averaged over classes: mean pairwise pixel distance and the total variance
    (trace of the covariance) of the classifier features. Compare with the same numbers on real images."""
    feats = _features(classifier, images)
    pixel, feature = [], []
    for c in labels.unique():
        mask = labels == c
        if int(mask.sum()) < 2:
            continue
        pixel.append(mean_pairwise_distance(images[mask]))
        feature.append(float(torch.cov(feats[mask].T).trace()))
    if not pixel:
        raise ValueError("diversity needs at least 2 samples of some class")
    return {"pixel_pairwise": sum(pixel) / len(pixel), "feature_variance": sum(feature) / len(feature)}


def image_report(classifier: DigitClassifier, samples: torch.Tensor, labels: torch.Tensor,
                 real_a: torch.Tensor, real_b: torch.Tensor, real_labels_a: torch.Tensor | None = None) -> dict:
    """Everything at once: accuracy, FD to real_b with its floor FD(real_a, real_b), diversity of the
    samples (and of real_a when its labels are given). Use len(samples) == len(real_a) for a fair floor."""
    out = {**{f"class_{k}": v for k, v in class_accuracy(classifier, samples, labels).items()},
           "frechet": frechet_distance(classifier, samples, real_b),
           "frechet_floor": frechet_distance(classifier, real_a, real_b),
           **{f"diversity_{k}": v for k, v in diversity(classifier, samples, labels).items()}}
    if real_labels_a is not None:
        out.update({f"real_diversity_{k}": v for k, v in diversity(classifier, real_a, real_labels_a).items()})
    return out
