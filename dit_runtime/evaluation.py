"""Measure a digit checkpoint: does it draw the digit asked for, and does it draw it in varied ways?

A classifier trained on real scikit-learn digit scans judges the samples (class-conditional accuracy: the share
it assigns to the requested class); diversity is the mean pairwise distance between samples of one class, next to
the same figure on real digits. Both are measured on the scans' own 8x8 grid of 0..16 ink levels: samples are
pooled 16x16 -> 8x8, and the real digits go through the same 8x8 -> 16x16 -> 8x8 round trip, so the classifier and
the distances see both in one representation. Needs scikit-learn (a test dependency), not the serving engine.

The Frechet distance between samples and real digits (a Gaussian fitted to each set, as FID does) is measured in
that same space, the 64 ink levels: no learned network to train or pin (a classifier layer would move with the
classifier's fit), the figures compare directly with Frechet distances over 8x8 pixels on the 0..16 scale, and the round
trip that real digits share with samples makes the distance measure the model, not the resampling. The shipped
models trained on all 1,797 scans, so none is unseen; instead the scans are split once, half of each digit per
side: samples are measured against the reference half, and as many scans per digit from the other half give the
real-against-real floor, what a model drawing real digits would score at that sample count. (Few samples in 64
dimensions fit a poor Gaussian: the floor is 38 at 10 per digit, 15 at 32, 10 at 50; compare at one count.)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointInfo
from .engine import Engine, EngineConfig, GenerationRequest, RequestLimits, SamplingParams
from .model import DiTModel
from .request import NUM_TRAIN_TIMESTEPS, rows_per_image
from .train.data import digits_to_model_space, load_digit_scans, model_space_to_digits

# The quality bar a digit checkpoint clears before it ships: dit-eval fails one below any of these.
MIN_CLASSIFIER_ACCURACY = 0.95
MIN_SAMPLE_ACCURACY = 0.90
MIN_DIVERSITY_RATIO = 0.5
HELD_OUT_FRACTION = 0.25
DIGITS_MODEL_SIDE = 16
# Frechet distance: which real digits form the reference half and which the real-against-real floor's half.
FRECHET_SPLIT_SEED = 0


@dataclass
class DigitClassifier:
    """An RBF SVM on 8x8 ink levels, with its accuracy on held-out real digits."""

    model: object
    held_out_accuracy: float  # on held-out scans after the same 16x16 round trip samples take
    held_out_accuracy_raw: float  # on the held-out scans as scanned

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(features)


def real_digit_features() -> tuple[np.ndarray, np.ndarray]:
    """All real digits as (N, 64) ink levels after the model's 8x8 -> 16x16 -> 8x8 round trip, and labels."""
    images, labels = load_digit_scans()
    x = digits_to_model_space(images, DIGITS_MODEL_SIDE)  # (N, 1, 16, 16)
    return model_space_to_digits(x).numpy(), labels.astype(np.int64)


def train_digit_classifier(seed: int = 0) -> DigitClassifier:
    """Fit on 75% of the real digits, score on the other 25%. Takes about a second, so nothing is cached."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = load_digit_scans()
    features = model_space_to_digits(digits_to_model_space(images, DIGITS_MODEL_SIDE)).numpy()
    raw = images.reshape(len(images), -1).astype(np.float64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=HELD_OUT_FRACTION,
                                           random_state=seed, stratify=labels)
    svm = SVC(C=10.0, gamma="scale").fit(features[idx_train], labels[idx_train])
    acc = float((svm.predict(features[idx_test]) == labels[idx_test]).mean())
    acc_raw = float((svm.predict(raw[idx_test]) == labels[idx_test]).mean())
    return DigitClassifier(svm, acc, acc_raw)


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all distinct pairs of rows."""
    f = torch.as_tensor(features, dtype=torch.float64)
    n = f.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(f, f)  # (n, n)
    return float(d.sum() / (n * (n - 1)))


def gaussian_frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet (2-Wasserstein) distance of two Gaussians.

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), a symmetric
    positive semi-definite matrix with the eigenvalues of S1 S2: two symmetric eigendecompositions in float64, no
    general matrix square root and no imaginary parts to discard. Rounding's tiny negative eigenvalues are clipped
    to 0: the real digits' covariance is singular (three zero eigenvalues after the round trip), and so is any
    covariance of fewer samples than dimensions.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w, v = np.linalg.eigh(cov1)
    sqrt1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # (D, D)
    cross = np.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1)  # (D,)
    distance = ((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(cross.clip(min=0)).sum()
    return float(max(distance, 0.0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def real_digit_halves() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The real digits' fixed split for the Frechet distance: reference half and floor half, each (N, 64) ink
    levels after the 16x16 round trip with labels; half of each digit's scans on each side, in a shuffled order
    (a digit's first scans in file order are less varied than a random draw: the floor half's first 32 per digit in
    file order score 29 against the reference half, the first 32 in shuffled order 15)."""
    from sklearn.model_selection import train_test_split

    real, labels = real_digit_features()
    ref, floor = train_test_split(np.arange(len(labels)), test_size=0.5, random_state=FRECHET_SPLIT_SEED,
                                  stratify=labels)
    return real[ref], labels[ref], real[floor], labels[floor]


def per_class_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` items of each class 0..9 (all of a class that has fewer)."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])


def eval_engine(model: DiTModel, info: CheckpointInfo, samples_per_class: int, batch_size: int = 128,
                **config) -> Engine:
    """An engine of ``eval_config``: a process that compiles it calls ``configure_compile`` on that first."""
    return Engine(model, info, eval_config(samples_per_class, batch_size, **config))


def eval_config(samples_per_class: int, batch_size: int = 128, **config) -> EngineConfig:
    """An engine config that takes one digit's ``samples_per_class`` images as one request (guided), ``batch_size``
    images or that request per forward pass; ``config``: further EngineConfig fields (device, precision, compile
    ...)."""
    rows = max(batch_size, samples_per_class) * rows_per_image(null_row=True)
    limits = RequestLimits(max_images_per_request=samples_per_class, max_inference_steps=NUM_TRAIN_TIMESTEPS)
    return EngineConfig(max_batch_size=rows, max_queue_size=10 * samples_per_class, limits=limits, **config)


def sample_images(engine: Engine, samples_per_class: int, sampling: SamplingParams) -> torch.Tensor:
    """``samples_per_class`` images of each digit (10 x k, 1, H, W) in [-1, 1], through the engine's offline loop.

    Each digit is one request of k images whose seed is the given seed plus the digit, so a server asked for that
    digit, k images and that seed draws the same images. They are the served uint8 images, read back as [-1, 1].
    """
    requests = [GenerationRequest((c,) * samples_per_class, replace(sampling, seed=sampling.seed + c))
                for c in range(10)]
    images = np.concatenate([r.images for r in engine.generate(requests)])  # (10 k, H, W, 1) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (10 k, 1, H, W)


def check_digit_model(info: CheckpointInfo, source: str) -> None:
    c = info.config
    if (c.in_channels, c.input_size, c.num_classes, info.space) != (1, DIGITS_MODEL_SIDE, 10, "pixel"):
        raise ValueError(f"{source}: dit-eval measures digit models (pixel space, 1 x 16 x 16, 10 classes); this "
                         f"checkpoint is {info.space}, {c.in_channels} x {c.input_size} x {c.input_size}, "
                         f"{c.num_classes} classes")


@dataclass
class EvalResult:
    """What dit-eval measured for one checkpoint."""

    checkpoint: str
    sampling: dict
    samples_per_class: int
    classifier_held_out_accuracy: float
    accuracy: float
    per_class_accuracy: list[float]
    diversity: float
    real_diversity: float
    frechet_distance: float  # samples against the reference half of the real digits, 8x8 ink levels
    real_frechet_distance: float  # the floor: as many real digits of the other half against the same reference
    frechet_reference_size: int  # real digits in the reference half
    real_frechet_samples: int  # samples_per_class scans of each digit, or all of its 87-91 if fewer
    per_class_diversity: list[float] = field(default_factory=list)
    per_class_real_diversity: list[float] = field(default_factory=list)
    sampling_seconds: float = 0.0

    @property
    def diversity_ratio(self) -> float:
        return self.diversity / self.real_diversity if self.real_diversity else math.nan

    @property
    def passed(self) -> bool:
        return self.accuracy >= MIN_SAMPLE_ACCURACY and self.diversity_ratio >= MIN_DIVERSITY_RATIO

    def to_dict(self) -> dict:
        return {**asdict(self), "diversity_ratio": self.diversity_ratio, "passed": self.passed,
                "bar": {"accuracy": MIN_SAMPLE_ACCURACY, "diversity_ratio": MIN_DIVERSITY_RATIO}}


def evaluate(engine: Engine, classifier: DigitClassifier, *, source: str, samples_per_class: int,
             sampling: SamplingParams) -> tuple[EvalResult, torch.Tensor]:
    """Sample every digit through ``engine``, classify and measure diversity; returns the result and the samples
    (10 x k, 1, H, W). The engine's limits must admit a request of ``samples_per_class`` images."""
    check_digit_model(engine.info, source)
    if sampling.seed is None:
        raise ValueError("give the sampling a seed: an evaluation must be repeatable")
    start = time.perf_counter()
    samples = sample_images(engine, samples_per_class, sampling)
    seconds = time.perf_counter() - start
    labels = torch.arange(10).repeat_interleave(samples_per_class)  # (10k,)
    result = score_samples(samples, labels, classifier, source=source, samples_per_class=samples_per_class,
                           sampling={"sampler": sampling.sampler, "num_inference_steps": sampling.num_inference_steps,
                                     "guidance_scale": sampling.guidance_scale, "seed": sampling.seed,
                                     "cache": sampling.cache,
                                     "full_steps": sampling.cache_policy.full_steps(sampling.num_inference_steps)})
    result.sampling_seconds = round(seconds, 2)
    return result, samples


def score_samples(samples: torch.Tensor, labels: torch.Tensor, classifier: DigitClassifier, *, source: str,
                  samples_per_class: int, sampling: dict) -> EvalResult:
    """Class accuracy, diversity and Frechet distance of samples (N, 1, H, W) in [-1, 1] drawn for ``labels`` (N,)."""
    features = model_space_to_digits(samples).numpy()  # (N, 64)
    predicted = classifier.predict(features)
    truth = labels.numpy()
    real, real_labels = real_digit_features()
    per_acc, per_div, per_real = [], [], []
    for c in range(10):
        mine = truth == c
        per_acc.append(float((predicted[mine] == c).mean()))
        per_div.append(mean_pairwise_distance(features[mine]))
        per_real.append(mean_pairwise_distance(real[real_labels == c]))
    reference, _, floor, floor_labels = real_digit_halves()
    floor = floor[per_class_subset(floor_labels, samples_per_class)]  # (about N, 64)
    return EvalResult(
        checkpoint=source, samples_per_class=samples_per_class, sampling=sampling,
        classifier_held_out_accuracy=classifier.held_out_accuracy, accuracy=float((predicted == truth).mean()),
        per_class_accuracy=per_acc, diversity=float(np.mean(per_div)), real_diversity=float(np.mean(per_real)),
        per_class_diversity=per_div, per_class_real_diversity=per_real,
        frechet_distance=frechet_distance(features, reference),
        real_frechet_distance=frechet_distance(floor, reference),
        frechet_reference_size=len(reference), real_frechet_samples=len(floor))


def save_sample_grid(samples: torch.Tensor, rows: int, path: str | Path, columns: int = 10, zoom: int = 4,
                     gap: int = 2) -> Path:
    """A PNG grid: one row per class, the first ``columns`` samples of each; [-1, 1] -> grey levels."""
    from PIL import Image

    per_row = samples.shape[0] // rows
    columns = min(columns, per_row)
    side = samples.shape[-1] * zoom
    grid = Image.new("L", (columns * (side + gap) + gap, rows * (side + gap) + gap), 255)
    for r in range(rows):
        for c in range(columns):
            img = samples[r * per_row + c, 0].clamp(-1, 1)
            # Ink is high values in the scans; draw it dark on white, as on paper.
            pixels = ((1 - (img + 1) / 2) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(pixels, mode="L").resize((side, side), Image.NEAREST)
            grid.paste(tile, (gap + c * (side + gap), gap + r * (side + gap)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
