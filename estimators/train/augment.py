"""Training-time views of stored chips: JPEG re-encoding, flips, small affine moves, low
resolution, motion blur, low light and colour changes, done per batch with torch; and the
plain centre crop."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from estimators.train.config import AugmentSettings


def centre_crop(chips: np.ndarray, size: int) -> torch.Tensor:
    """(n, S, S, 3) uint8 stored chips -> (n, 3, size, size) float in [0, 1]: the model's crop."""
    border = (chips.shape[1] - size) // 2
    crop = chips[:, border : border + size, border : border + size]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2).float() / 255.0


def _jpeg(chips: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> np.ndarray:
    chips = chips.copy()
    low, high = settings.jpeg_quality
    for i in np.flatnonzero(rng.random(len(chips)) < settings.jpeg):
        quality = int(rng.integers(low, high + 1))
        ok, encoded = cv2.imencode(".jpg", chips[i], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            chips[i] = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return chips


def _affine(
    images: torch.Tensor, size: int, rng: np.random.Generator, settings: AugmentSettings
) -> torch.Tensor:
    """Random flip, zoom, rotation and shift; at rest this is exactly the centre crop."""
    n, stored = len(images), images.shape[-1]
    extent = size / stored  # the output's half-width in the input's normalized units
    zoom = 1 + rng.uniform(-settings.scale, settings.scale, n)
    angle = np.radians(rng.uniform(-settings.rotate_deg, settings.rotate_deg, n))
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0) if settings.flip else np.ones(n)
    shift = rng.uniform(-settings.shift_px, settings.shift_px, (n, 2)) * 2 / stored
    cos, sin = np.cos(angle) * extent / zoom, np.sin(angle) * extent / zoom
    theta = np.stack(
        [np.stack([cos * flip, -sin, shift[:, 0]], 1), np.stack([sin * flip, cos, shift[:, 1]], 1)],
        1,
    )
    grid = F.affine_grid(torch.from_numpy(theta).float(), [n, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _low_res(
    images: torch.Tensor, rng: np.random.Generator, settings: AugmentSettings
) -> torch.Tensor:
    """Some faces seen as a small face in a video would be: shrunk, then scaled back up."""
    chosen = torch.from_numpy(rng.random(len(images)) < settings.low_res)
    if not chosen.any():
        return images
    side = int(rng.integers(settings.low_res_px[0], settings.low_res_px[1] + 1))
    size = images.shape[-1]
    small = F.interpolate(images[chosen], size=(side, side), mode="bilinear", antialias=True)
    images = images.clone()
    images[chosen] = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return images


def _colour(
    images: torch.Tensor, rng: np.random.Generator, settings: AugmentSettings
) -> torch.Tensor:
    n = len(images)

    def factors(spread: float) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(1 - spread, 1 + spread, (n, 1, 1, 1))).float()

    grey = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    saturation = factors(settings.saturation)
    saturation[torch.from_numpy(rng.random(n) < settings.grey)] = 0.0
    images = grey + (images - grey) * saturation
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = mean + (images - mean) * factors(settings.contrast)
    return (images * factors(settings.brightness)).clamp(0.0, 1.0)


def _line_kernel(length: int, angle: float) -> torch.Tensor:
    """A normalized (length, length) kernel along a line through its centre: the smear of a
    face moving that many pixels during the exposure."""
    kernel = np.zeros((length, length), np.float32)
    centre, half = (length - 1) / 2, (length - 1) / 2
    for t in np.linspace(-half, half, 4 * length):
        kernel[round(centre + t * math.sin(angle)), round(centre + t * math.cos(angle))] = 1.0
    return torch.from_numpy(kernel / kernel.sum())


def _motion_blur(
    images: torch.Tensor, rng: np.random.Generator, settings: AugmentSettings
) -> torch.Tensor:
    """Some faces smeared along a random direction, as a moving head is in a video frame."""
    chosen = np.flatnonzero(rng.random(len(images)) < settings.motion_blur)
    if len(chosen) == 0:
        return images
    images = images.clone()
    low, high = settings.motion_blur_px
    for i in chosen:
        length = int(rng.integers(low, high + 1)) | 1  # odd: the kernel has a centre pixel
        kernel = _line_kernel(length, float(rng.uniform(0, math.pi)))
        weight = kernel.expand(3, 1, length, length)
        padded = F.pad(images[i : i + 1], [length // 2] * 4, mode="replicate")
        images[i] = F.conv2d(padded, weight, groups=3)[0]
    return images


def _low_light(
    images: torch.Tensor, rng: np.random.Generator, settings: AugmentSettings
) -> torch.Tensor:
    """Some faces darkened and grainy, as a camera sees them in a dim room."""
    chosen = torch.from_numpy(rng.random(len(images)) < settings.low_light)
    count = int(chosen.sum())
    if count == 0:
        return images
    gain = torch.from_numpy(rng.uniform(*settings.low_light_gain, (count, 1, 1, 1))).float()
    noise = torch.from_numpy(
        rng.normal(0.0, settings.low_light_noise, images[chosen].shape)
    ).float()
    images = images.clone()
    images[chosen] = (images[chosen] * gain + noise).clamp(0.0, 1.0)
    return images


def augment(
    chips: np.ndarray, size: int, rng: np.random.Generator, settings: AugmentSettings
) -> torch.Tensor:
    """(n, S, S, 3) uint8 stored chips -> (n, 3, size, size) float in [0, 1], each a random view."""
    chips = _jpeg(chips, rng, settings)
    images = torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0
    images = _affine(images, size, rng, settings)
    images = _low_res(images, rng, settings)
    images = _motion_blur(images, rng, settings)
    images = _colour(images, rng, settings)
    return _low_light(images, rng, settings)


def age_targets(
    age: torch.Tensor, bins: int, sigma_min: float, sigma_per_year: float, sigma_max: float
) -> torch.Tensor:
    """(n,) years -> (n, bins) Gaussian label distributions, wider for older faces (whose age
    is harder to tell, and less precisely labelled)."""
    ages = torch.arange(bins, dtype=torch.float32)
    centre = age.clamp(0, bins - 1)[:, None]
    sigma = (sigma_min + sigma_per_year * centre).clamp(max=sigma_max)
    density = torch.exp(-0.5 * ((ages[None] - centre) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    return density / density.sum(dim=1, keepdim=True)
