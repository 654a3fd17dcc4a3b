"""Face alignment: MediaPipe keypoints -> dlib-equivalent chips and fast warped chips.

The age and gender models were trained on chips cut by dlib's
``get_face_chip_details(shape, size, padding=0.2)`` + ``extract_image_chip``
from its 5-point landmarks. We have no dlib at run time, so we fit a similarity
transform from MediaPipe's keypoints to a template expressed in dlib's own
normalised chip frame, then replay dlib's extraction (pyramid level choice,
its 5-tap pyramid, bilinear sampling, zero fill) so the pixels match too.
"""

from __future__ import annotations

import cv2
import numpy as np

from stream.types import check_shape

# MediaPipe keypoint order: 0 right eye, 1 left eye, 2 nose tip, 3 mouth
# centre, 4 right ear tragion, 5 left ear tragion (subject's right = image left).
NUM_KEYPOINTS = 6

# Keypoints the alignment uses. Ear tragions are left out: they are often
# occluded or mislocated, and adding them made the framing worse (see
# tools/calibrate_alignment.py).
TEMPLATE_KEYPOINTS = (0, 1, 3)

# Where those keypoints sit in dlib's chip frame, normalised to [0, 1] (x right,
# y down; multiply by the chip size to get dlib's "from_points"), with the
# padding=0.2 framing baked in. Derived by tools/calibrate_alignment.py as the
# robust mean over the UTKFace dev crops of MediaPipe keypoints mapped through
# dlib's own chip_details.
TEMPLATE = np.array(
    [
        [0.316203, 0.299139],  # right eye
        [0.698859, 0.305316],  # left eye
        [0.503385, 0.713227],  # mouth centre
    ],
    dtype=np.float64,
)


def _similarity_batch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, no reflection) mapping src -> dst; (n,k,2) -> (n,2,3)."""
    src_mean = src.mean(axis=1, keepdims=True)
    dst_mean = dst.mean(axis=1, keepdims=True)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    k = src.shape[1]
    cov = np.einsum("nki,nkj->nij", dst_c, src_c) / k
    u, d, vt = np.linalg.svd(cov)
    # Flip the weakest axis when the best orthogonal fit would be a reflection.
    sign = np.where(np.linalg.det(u) * np.linalg.det(vt) < 0, -1.0, 1.0)
    d = d.copy()
    d[:, 1] *= sign
    u = u.copy()
    u[:, :, 1] *= sign[:, None]
    rotation = u @ vt
    src_var = (src_c**2).sum(axis=(1, 2)) / k
    scale = d.sum(axis=1) / np.where(src_var > 0, src_var, 1.0)
    linear = rotation * scale[:, None, None]
    translation = dst_mean[:, 0] - np.einsum("nij,nj->ni", linear, src_mean[:, 0])
    return np.concatenate([linear, translation[:, :, None]], axis=2)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Return the 2x3 least-squares similarity (rotation, uniform scale, shift) taking src to dst.

    Args:
        src: (k, 2) points, k >= 2.
        dst: (k, 2) corresponding points.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    check_shape("src", src, (None, 2))
    check_shape("dst", dst, (src.shape[0], 2))
    if src.shape[0] < 2:
        raise ValueError(f"src must have at least 2 points, got shape {src.shape}")
    return _similarity_batch(src[None], dst[None])[0]


def _chip_geometry(keypoints: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dlib chip_details for each face: rect centre (n,2), rect width (n,), angle (n,).

    Mirrors dlib's chip_details(from, to, dims): fit template*size -> image, read
    scale and angle off the fit, and centre a size*scale square on the image of
    the chip centre.
    """
    pts = keypoints[:, TEMPLATE_KEYPOINTS].astype(np.float64)
    template = np.broadcast_to(TEMPLATE * size, pts.shape)
    fit = _similarity_batch(template, pts)
    angle = np.arctan2(fit[:, 1, 0], fit[:, 0, 0])
    width = size * np.hypot(fit[:, 0, 0], fit[:, 1, 0])
    centre = fit[:, :, :2] @ np.array([size / 2, size / 2]) + fit[:, :, 2]
    return centre, width, angle


def _check_keypoints(keypoints: np.ndarray, size: int) -> np.ndarray:
    keypoints = np.asarray(keypoints)
    check_shape("keypoints", keypoints, (None, NUM_KEYPOINTS, 2))
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    return keypoints


def chip_transforms(keypoints: np.ndarray, size: int) -> np.ndarray:
    """Affine maps image px -> chip px framing each face as dlib would; (n,6,2) -> (n,2,3).

    Usable directly with cv2.warpAffine. dlib maps chip pixel 0 to the rect's
    first edge and size-1 to its last, so one chip pixel spans
    (width-1)/(size-1) image pixels, not width/size.
    """
    keypoints = _check_keypoints(keypoints, size)
    centre, width, angle = _chip_geometry(keypoints, size)
    scale = (size - 1) / (width - 1)
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    # Inverse of: image = centre + R(angle) * (chip - (size-1)/2) / scale.
    linear = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1)
    shift = (size - 1) / 2 - np.einsum("nij,nj->ni", linear, centre)
    return np.concatenate([linear, shift[:, :, None]], axis=2).astype(np.float32)


def _pyramid_down(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2>: 5x5 [1 4 6 4 1]^2/256 filter, valid region, stride 2, truncating."""
    rows, cols = image.shape[:2]
    if rows <= 8 or cols <= 8:
        return np.zeros((0, 0, 3), np.uint8)
    out_rows, out_cols = (rows - 3) // 2, (cols - 3) // 2
    a = image.astype(np.int32)
    taps = (1, 4, 6, 4, 1)
    zero = np.zeros((), np.int32)  # an array start keeps each sum an array (not 0 | array)
    t = sum((w * a[:, i : i + 2 * out_cols : 2] for i, w in enumerate(taps)), zero)
    d = sum((w * t[i : i + 2 * out_rows : 2] for i, w in enumerate(taps)), zero)
    return (d // 256).astype(np.uint8)


def _rect_down(rect: np.ndarray) -> np.ndarray:
    # dlib's pyramid_down<2>::point_down on (left, top, right, bottom).
    return rect / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])


def _rect_area(rect: np.ndarray) -> float:
    # dlib's drectangle counts both edges: width = right - left + 1.
    return float((rect[2] - rect[0] + 1) * (rect[3] - rect[1] + 1))


def _rotate(centre: np.ndarray, points: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    d = points - centre
    return centre + np.stack([cos * d[:, 0] - sin * d[:, 1], sin * d[:, 0] + cos * d[:, 1]], -1)


def _corners(rect: np.ndarray) -> np.ndarray:
    left, top, right, bottom = rect
    return np.array([[left, top], [right, top], [left, bottom], [right, bottom]])


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dlib's interpolate_bilinear: a sample whose 2x2 neighbourhood leaves the image is black."""
    rows, cols = image.shape[:2]
    left = np.floor(x).astype(np.int64)
    top = np.floor(y).astype(np.int64)
    inside = (left >= 0) & (top >= 0) & (left + 1 < cols) & (top + 1 < rows)
    out = np.zeros(x.shape + (3,), np.uint8)
    if not inside.any():
        return out
    x0, y0 = left[inside], top[inside]
    fx = (x[inside] - x0)[:, None]
    fy = (y[inside] - y0)[:, None]
    img = image.astype(np.float64)
    value = (1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1]) + fy * (
        (1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]
    )
    out[inside] = value.astype(np.uint8)
    return out


def _extract_one(
    image: np.ndarray, centre: np.ndarray, width: float, angle: float, size: int
) -> np.ndarray:
    """Replay dlib's extract_image_chip for one chip_details."""
    half = (width - 1) / 2
    rect = np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])
    # A chip much smaller than the face is cut from a pyramid level so bilinear
    # sampling does not alias; dlib picks the level and a crop margin this way.
    depth, grow = 0, 2.0
    down = _rect_down(rect)
    while _rect_area(down) > size * size:
        down = _rect_down(down)
        depth += 1
        grow = grow * 2 + 2
    rotated = _rotate(centre, _corners(rect), angle)
    rows, cols = image.shape[:2]
    lo = np.maximum(rotated.min(axis=0) - grow, 0.0)
    hi = np.minimum(rotated.max(axis=0) + grow, [cols - 1, rows - 1])
    if (lo > hi).any():
        return np.zeros((size, size, 3), np.uint8)
    # drectangle -> rectangle conversion rounds each edge.
    x0, y0 = np.floor(lo + 0.5).astype(int)
    x1, y1 = np.floor(hi + 0.5).astype(int)
    level = image[y0 : y1 + 1, x0 : x1 + 1]
    rect = rect - np.array([x0, y0, x0, y0])
    for _ in range(depth):
        level = _pyramid_down(level)
        rect = _rect_down(rect)
    if level.size == 0:
        return np.zeros((size, size, 3), np.uint8)
    tl, tr, bl, _ = _rotate((rect[:2] + rect[2:]) / 2, _corners(rect), angle)
    steps = np.arange(size) / (size - 1)
    grid_x, grid_y = np.meshgrid(steps, steps)
    x = tl[0] + grid_x * (tr[0] - tl[0]) + grid_y * (bl[0] - tl[0])
    y = tl[1] + grid_x * (tr[1] - tl[1]) + grid_y * (bl[1] - tl[1])
    return _bilinear(level, x, y)


def extract_chips(image_rgb: np.ndarray, keypoints: np.ndarray, size: int) -> np.ndarray:
    """Cut one aligned (size, size, 3) uint8 chip per face, matching dlib's pixels.

    Args:
        image_rgb: (H, W, 3) uint8 RGB frame.
        keypoints: (n, 6, 2) MediaPipe keypoints in pixels.
        size: chip side (64 for age, 32 for gender).

    Returns:
        (n, size, size, 3) uint8; area outside the frame is black, as in dlib.
    """
    image_rgb = np.asarray(image_rgb)
    check_shape("image_rgb", image_rgb, (None, None, 3))
    if image_rgb.dtype != np.uint8:
        raise ValueError(f"image_rgb must be uint8, got {image_rgb.dtype}")
    keypoints = _check_keypoints(keypoints, size)
    chips = np.zeros((keypoints.shape[0], size, size, 3), np.uint8)
    if keypoints.shape[0] == 0:
        return chips
    centres, widths, angles = _chip_geometry(keypoints, size)
    for i in range(keypoints.shape[0]):
        chips[i] = _extract_one(image_rgb, centres[i], widths[i], angles[i], size)
    return chips


def warp_transforms(keypoints: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Affine maps image px -> chip px: dlib's framing widened `margin` times about its centre.

    margin 1.0 frames the face as `chip_transforms` does (dlib's padding 0.2); larger
    margins add forehead, hair and chin around it. (n,6,2) -> (n,2,3).
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    base = chip_transforms(keypoints, size).astype(np.float64)
    centre = (size - 1) / 2
    # Shrink about the chip centre: chip' = centre + (chip - centre) / margin.
    linear = base[:, :, :2] / margin
    shift = base[:, :, 2] / margin + centre * (1 - 1 / margin)
    return np.concatenate([linear, shift[:, :, None]], axis=2)


def _warp_one(image: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    """warpAffine of one face, shrinking its region by area first when the chip is much
    smaller than the face, so that bilinear sampling does not alias."""
    image_px_per_chip_px = 1.0 / np.sqrt(abs(np.linalg.det(transform[:, :2])))
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], float)
    inverse = cv2.invertAffineTransform(transform)
    region = corners @ inverse[:, :2].T + inverse[:, 2]
    rows, cols = image.shape[:2]
    x0, y0 = np.maximum(np.floor(region.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(region.max(axis=0)).astype(int) + 2, [cols, rows])
    if x0 >= x1 or y0 >= y1:
        return np.zeros((size, size, 3), np.uint8)
    patch = image[y0:y1, x0:x1]
    transform = transform.copy()
    transform[:, 2] += transform[:, :2] @ np.array([x0, y0], float)
    # An integer factor keeps OpenCV's area resize on its fast path.
    factor = int(image_px_per_chip_px / 1.5)
    if factor >= 2:
        patch = cv2.resize(patch, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
        scale = np.array([patch.shape[1] / (x1 - x0), patch.shape[0] / (y1 - y0)])
        transform[:, :2] = transform[:, :2] / scale
    return cv2.warpAffine(
        patch, transform, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )


def warp_chips(
    image_rgb: np.ndarray, keypoints: np.ndarray, size: int, margin: float = 1.0
) -> np.ndarray:
    """Aligned (n, size, size, 3) uint8 chips by one affine warp each: dlib's framing
    (see `warp_transforms`) without replaying dlib's pixels, so several times cheaper than
    `extract_chips`. Area outside the frame is black."""
    image_rgb = np.asarray(image_rgb)
    check_shape("image_rgb", image_rgb, (None, None, 3))
    keypoints = _check_keypoints(keypoints, size)
    chips = np.zeros((keypoints.shape[0], size, size, 3), np.uint8)
    if keypoints.shape[0] == 0:
        return chips
    for i, transform in enumerate(warp_transforms(keypoints, size, margin)):
        chips[i] = _warp_one(image_rgb, transform, size)
    return chips


def pad_to_canvas(
    image: np.ndarray, scale: float = 2.0, *, border: int = cv2.BORDER_REPLICATE
) -> tuple[np.ndarray, np.ndarray]:
    """Centre a tight face crop on a scale-times larger canvas so a detector sees context.

    BlazeFace misses faces that fill the whole frame. Replicated borders are the
    default: on the 1,968 UTKFace dev crops they miss 3 faces vs 4 for black
    (BORDER_CONSTANT) with equal prediction agreement. TEMPLATE was calibrated
    on replicated canvases.

    Returns the canvas and the crop's (x, y) offset in it; subtract the offset
    from keypoints found on the canvas to get crop coordinates.
    """
    image = np.asarray(image)
    check_shape("image", image, (None, None, 3))
    if scale < 1.0:
        raise ValueError(f"scale must be >= 1, got {scale}")
    rows, cols = image.shape[:2]
    pad_y = int(round(rows * (scale - 1) / 2))
    pad_x = int(round(cols * (scale - 1) / 2))
    canvas = cv2.copyMakeBorder(image, pad_y, pad_y, pad_x, pad_x, border, value=0)
    return canvas, np.array([pad_x, pad_y], dtype=np.float32)
