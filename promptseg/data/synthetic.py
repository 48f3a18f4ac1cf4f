"""Synthetic segmentation tasks for pretraining and for tests that need no real data.

A *style* fixes how a family of images is generated: which structures exist (shape family, size
range, typical location and orientation, nesting inside a host), how each looks (mean colour,
texture scale and strength) and the imaging conditions (blur, bias field, noise). A task draws all
its examples from one style and takes one structure (the target) as the mask, so prompts and queries
agree; the other structures are distractors whose intensity differs from the target's, some brighter
and some darker, so that the target is defined by its appearance, shape and context together.

Everything is rendered batched in torch at the requested resolution; geometry is in normalised
coordinates ([-1, 1] across the image) so styles mean the same at any resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.data.augment import gaussian_blur
from promptseg.data.tasks import ArrayTask

FAMILIES: tuple[str, ...] = ("ellipse", "ring", "polygon", "spots", "tubes", "field")
_FAMILY_WEIGHTS = np.array([0.3, 0.08, 0.17, 0.18, 0.12, 0.15])
_REGION_FAMILIES = ("spots", "tubes", "field")  # structures scattered over a region


@dataclass(frozen=True)
class StructureStyle:
    """How one structure is drawn. Sizes are radii in normalised units (fraction of the half-image),
    or fractions of the host's radius when `parent` >= 0 (index of the host in the style)."""

    family: str
    radius: tuple[float, float]
    aspect: float  # axis ratio (>= 1) of the structure's ellipse / region
    angle: float  # mean orientation (radians)
    angle_spread: float  # std of the orientation across examples
    center: tuple[float, float]  # mean centre (x, y)
    center_spread: float  # std of the centre across examples
    irregularity: float  # amplitude of the smooth boundary perturbation
    thickness: float  # ring width (fraction of radius), tube half-width or field coverage
    detail: float  # spot radius, or tube / field noise scale (normalised units)
    count: tuple[int, int]  # number of spots (min, max)
    vertices: int  # polygon corners
    parent: int
    intensity: np.ndarray  # (C,) mean colour in [0, 1]
    texture_scale: float  # texture correlation length (normalised units)
    texture_amp: float


@dataclass(frozen=True)
class SyntheticStyle:
    """A generative style: structures in drawing order, the target's index, and imaging
    conditions."""

    structures: tuple[StructureStyle, ...]
    target: int
    background: np.ndarray  # (C,)
    color: bool  # distinct channels; otherwise rendered in grayscale and replicated
    background_texture: tuple[float, float]  # (scale, amplitude)
    blur: float  # Gaussian blur std (normalised units)
    bias: float  # multiplicative bias-field amplitude
    noise: float  # additive noise std


def smooth_noise(
    generator: torch.Generator, n: int, size: int, scale: float, channels: int = 1
) -> torch.Tensor:
    """Smooth random fields (n, channels, size, size), zero mean and unit std (estimated on every
    4th pixel), with correlation length `scale` (normalised units: 2 = the whole image), made by
    bicubic upsampling of coarse white noise."""
    cells = int(min(size, max(2, round(2.0 / max(scale, 1e-3))))) + 2
    coarse = torch.randn((n, channels, cells, cells), generator=generator)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    std, mean = torch.std_mean(field[..., ::4, ::4], dim=(-2, -1), keepdim=True)
    return (field - mean) / std.clamp_min(1e-6)


def _pixel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1]: x (1, 1, size) and y (1, size, 1)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return coords.view(1, 1, size), coords.view(1, size, 1)


@dataclass
class _Geometry:
    """Per-example placement of one structure: centre (n, 2), radius (n,), aspect (n,), angle
    (n,)."""

    center: np.ndarray
    radius: np.ndarray
    aspect: np.ndarray
    angle: np.ndarray

    def local(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates (n, size, size) in the structure's frame: its ellipse is u^2 + v^2 <= 1."""
        xs, ys = _pixel_grid(size)
        t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).view(-1, 1, 1)  # noqa: E731
        dx, dy = xs - t(self.center[:, 0]), ys - t(self.center[:, 1])
        cos, sin = t(np.cos(self.angle)), t(np.sin(self.angle))
        semi_u = t(self.radius * np.sqrt(self.aspect))
        semi_v = t(self.radius / np.sqrt(self.aspect))
        return (cos * dx + sin * dy) / semi_u, (-sin * dx + cos * dy) / semi_v


def _place(
    s: StructureStyle, parent: _Geometry | None, n: int, rng: np.random.Generator
) -> _Geometry:
    """Draw the per-example geometry of structure `s` (inside `parent`'s ellipse when nested)."""
    radius = rng.uniform(*s.radius, n)
    aspect = s.aspect * np.exp(rng.normal(0, 0.1, n))
    angle = s.angle + rng.normal(0, s.angle_spread, n)
    if parent is None:
        center = np.clip(np.asarray(s.center) + rng.normal(0, s.center_spread, (n, 2)), -0.8, 0.8)
        return _Geometry(center, radius, aspect, angle)
    phi, rho = rng.uniform(0, 2 * np.pi, n), 0.5 * np.sqrt(rng.uniform(0, 1, n))
    u = rho * np.cos(phi) * parent.radius * np.sqrt(parent.aspect)
    v = rho * np.sin(phi) * parent.radius / np.sqrt(parent.aspect)
    cos, sin = np.cos(parent.angle), np.sin(parent.angle)
    center = parent.center + np.stack([cos * u - sin * v, sin * u + cos * v], axis=1)
    return _Geometry(center, radius * parent.radius, aspect, angle)


def _polygon(
    u: torch.Tensor, v: torch.Tensor, vertices: int, rng: np.random.Generator
) -> torch.Tensor:
    """Inside test (n, H, W) of random star-shaped polygons with `vertices` corners around the
    origin of the local frame (u, v), corner radii 0.55-1."""
    n = u.shape[0]
    base = 2 * np.pi * np.arange(vertices) / vertices
    phi = np.sort(base + rng.uniform(-0.25, 0.25, (n, vertices)) * 2 * np.pi / vertices, axis=1)
    rad = rng.uniform(0.55, 1.0, (n, vertices))
    corners = torch.from_numpy(np.stack([rad * np.cos(phi), rad * np.sin(phi)], axis=-1)).float()
    phi_t = torch.from_numpy(phi).float().contiguous()
    theta = torch.remainder(torch.atan2(v, u).flatten(1) - phi_t[:, :1], 2 * np.pi) + phi_t[:, :1]
    start = (torch.searchsorted(phi_t, theta.contiguous()) - 1) % vertices
    a = torch.gather(corners, 1, start[..., None].expand(-1, -1, 2))
    b = torch.gather(corners, 1, ((start + 1) % vertices)[..., None].expand(-1, -1, 2))
    px, py = u.flatten(1), v.flatten(1)
    edge_x, edge_y = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    side_p = edge_x * (py - a[..., 1]) - edge_y * (px - a[..., 0])
    side_o = edge_x * (-a[..., 1]) - edge_y * (-a[..., 0])
    return ((side_p * side_o) >= 0).view_as(u)


def _spots(s: StructureStyle, geo: _Geometry, size: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, H, W) union of `count` small ellipses of radius ~`detail` scattered over the geometry's
    ellipse."""
    n, most = geo.radius.shape[0], s.count[1]
    number = rng.integers(s.count[0], s.count[1] + 1, n)
    phi, rho = rng.uniform(0, 2 * np.pi, (n, most)), np.sqrt(rng.uniform(0, 1, (n, most)))
    u = rho * np.cos(phi) * (geo.radius * np.sqrt(geo.aspect))[:, None]
    v = rho * np.sin(phi) * (geo.radius / np.sqrt(geo.aspect))[:, None]
    cos, sin = np.cos(geo.angle)[:, None], np.sin(geo.angle)[:, None]
    cx = geo.center[:, :1] + cos * u - sin * v
    cy = geo.center[:, 1:] + sin * u + cos * v
    radius = s.detail * rng.uniform(0.7, 1.3, (n, most))
    squash = np.exp(rng.uniform(0.0, 0.5, (n, most)))
    turn = rng.uniform(0, np.pi, (n, most))
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))[..., None, None]  # noqa: E731
    xs, ys = _pixel_grid(size)
    dx, dy = xs[None] - t(cx), ys[None] - t(cy)  # (n, most, 1, W) and (n, most, H, 1)
    cos2, sin2 = np.cos(turn) ** 2, np.sin(turn) ** 2
    inv_u, inv_v = 1 / (radius**2 * squash), squash / radius**2
    quad_x, quad_y = t(cos2 * inv_u + sin2 * inv_v), t(sin2 * inv_u + cos2 * inv_v)
    cross = t(2 * np.cos(turn) * np.sin(turn) * (inv_u - inv_v))
    inside = (quad_x * dx * dx + quad_y * dy * dy) + cross * dx * dy <= 1
    valid = torch.from_numpy(np.arange(most)[None] < number[:, None])[..., None, None]
    return (inside & valid).any(dim=1)


def _shape(
    s: StructureStyle, geo: _Geometry, size: int, rng: np.random.Generator, gen: torch.Generator
) -> torch.Tensor:
    """Occupancy (n, H, W) bool of structure `s` at geometry `geo` (before nesting and
    occlusion)."""
    n = geo.radius.shape[0]
    u, v = geo.local(size)
    rho = torch.sqrt(u * u + v * v)
    if s.irregularity > 0:
        wobble_scale = float(np.clip(np.median(geo.radius), 0.05, 1.0))
        rho = rho + s.irregularity * smooth_noise(gen, n, size, wobble_scale)[:, 0]
    if s.family == "ellipse":
        return rho <= 1
    if s.family == "ring":
        return (rho <= 1) & (rho >= 1 - s.thickness)
    if s.family == "polygon":
        return _polygon(u, v, s.vertices, rng)
    if s.family == "spots":
        return _spots(s, geo, size, rng)
    field = smooth_noise(gen, n, size, s.detail)[:, 0]
    if s.family == "tubes":
        return (rho <= 1) & (field.abs() < s.thickness)
    threshold = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * s.thickness)).item()
    return (rho <= 1) & (field > threshold)


def render(
    style: SyntheticStyle, n: int, resolution: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n examples of `style`: images (n, C, R, R) float32 in [0, 1] (C = len(style.background))
    and label maps (n, R, R) int64 (0 = background, structure i -> i + 1)."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    channels = len(style.background) if style.color else 1
    geometry: list[_Geometry] = []
    occupancy: list[torch.Tensor] = []
    labels = torch.zeros((n, resolution, resolution), dtype=torch.int64)
    for index, s in enumerate(style.structures):
        parent = geometry[s.parent] if s.parent >= 0 else None
        geo = _place(s, parent, n, rng)
        occ = _shape(s, geo, resolution, rng, gen)
        if s.parent >= 0:
            occ &= occupancy[s.parent]
        geometry.append(geo)
        occupancy.append(occ)
        labels[occ] = index + 1
    target = style.target + 1
    hidden = ~(labels == target).flatten(1).any(dim=1)
    labels[hidden] = torch.where(occupancy[style.target][hidden], target, labels[hidden])

    scale, amp = style.background_texture
    image = torch.from_numpy(style.background[:channels].astype(np.float32)).view(1, -1, 1, 1)
    image = image + amp * smooth_noise(gen, n, resolution, scale)
    for index, s in enumerate(style.structures):
        region = (labels == index + 1)[:, None]
        mean = s.intensity[None, :channels] + rng.normal(0, 0.03, (n, channels))
        look = torch.from_numpy(mean.astype(np.float32)).view(n, channels, 1, 1)
        look = look + s.texture_amp * smooth_noise(gen, n, resolution, s.texture_scale)
        image = torch.where(region, look, image)
    image = gaussian_blur(image, style.blur * resolution / 2)
    if style.bias > 0:
        image = image * (1 + style.bias * smooth_noise(gen, n, resolution, 1.5))
    image = image + style.noise * torch.randn(image.shape, generator=gen)
    sample = image.flatten(1)[:, ::7]
    low = sample.kthvalue(max(1, int(0.005 * sample.shape[1])), dim=1).values.view(n, 1, 1, 1)
    high = sample.kthvalue(int(0.995 * sample.shape[1]), dim=1).values.view(n, 1, 1, 1)
    image = ((image - low) / (high - low).clamp_min(1e-6)).clamp(0.0, 1.0)
    return image.expand(-1, len(style.background), -1, -1).contiguous(), labels


def _structure(
    rng: np.random.Generator,
    family: str,
    radius: tuple[float, float],
    parent: int,
    intensity: np.ndarray,
) -> StructureStyle:
    """A random structure style of `family` with radius range `radius`."""
    detail = {
        "spots": rng.uniform(0.03, 0.08),
        "tubes": rng.uniform(0.15, 0.4),
        "field": rng.uniform(0.08, 0.3),
    }
    thickness = {
        "ring": rng.uniform(0.2, 0.5),
        "tubes": rng.uniform(0.06, 0.15),
        "field": rng.uniform(0.15, 0.45),
    }
    return StructureStyle(
        family=family,
        radius=radius,
        aspect=float(np.exp(rng.uniform(0, np.log(2.5 if family != "tubes" else 1.5)))),
        angle=float(rng.uniform(0, np.pi)),
        angle_spread=float(rng.choice([0.1, 0.4, np.pi])),
        center=tuple(rng.uniform(-0.45, 0.45, 2)),
        center_spread=float(rng.uniform(0.05, 0.25)),
        irregularity=float(rng.choice([0.0, rng.uniform(0.05, 0.3)], p=[0.3, 0.7]))
        if family != "polygon"
        else 0.0,
        thickness=float(thickness.get(family, 0.0)),
        detail=float(detail.get(family, 0.0)),
        count=(int(rng.integers(1, 6)), int(rng.integers(6, 20))),
        vertices=int(rng.integers(4, 9)),
        parent=parent,
        intensity=intensity,
        texture_scale=float(np.exp(rng.uniform(np.log(0.02), np.log(0.3)))),
        texture_amp=float(rng.uniform(0.0, 0.1)),
    )


def _intensities(
    rng: np.random.Generator, count: int, channels: int, color: bool, target: int
) -> np.ndarray:
    """Mean colours (count + 1, C) for background (row 0) and structures, the target differing from
    the background by >= 0.2 and from every distractor by >= 0.12 (max over channels)."""
    for _ in range(200):
        values = rng.uniform(0.05, 0.95, (count + 1, channels if color else 1))
        gap = np.abs(values - values[target + 1]).max(axis=1)
        gap[target + 1] = 1.0
        if gap[0] >= 0.2 and gap[1:].min() >= 0.12:
            break
    return np.repeat(values, channels, axis=1) if not color else values


def sample_style(rng: np.random.Generator, channels: int = 3) -> SyntheticStyle:
    """A random generative style with one target and 1-4 distractor structures.

    Relations: the target stands alone (45%), lies inside a host structure (35%, e.g. a lesion in an
    organ, vessels in tissue) or hosts a distractor inside it (20%, an organ with a lesion).
    """
    family = lambda: str(rng.choice(FAMILIES, p=_FAMILY_WEIGHTS / _FAMILY_WEIGHTS.sum()))  # noqa: E731
    big = lambda: str(rng.choice(["ellipse", "polygon"]))  # noqa: E731

    def size(lo: float, hi: float) -> tuple[float, float]:
        low = rng.uniform(lo, hi)
        return low, low * rng.uniform(1.0, 1.4)

    def region_size(kind: str) -> tuple[float, float]:
        return size(0.4, 0.9) if kind in _REGION_FAMILIES else size(0.08, 0.45)

    relation = rng.choice(["alone", "inside", "host"], p=[0.45, 0.35, 0.2])
    # (family, radius range, parent) in drawing order: host first, loose structures, nested last.
    plan: list[tuple[str, tuple[float, float], int]] = []
    if relation == "inside":
        plan.append((big(), size(0.4, 0.7), -1))
    loose = [family() for _ in range(int(rng.integers(1, 4)))]
    target_slot = int(rng.integers(len(loose) + 1))
    loose.insert(target_slot, big() if relation == "host" else family())
    target = len(plan) + target_slot
    plan.extend((kind, region_size(kind), -1) for kind in loose)
    if relation == "inside":
        target = len(plan)
        kind = family()
        plan.append((kind, size(0.7, 1.0) if kind in _REGION_FAMILIES else size(0.15, 0.45), 0))
    elif relation == "host":
        kind = str(rng.choice(["ellipse", "spots", "polygon"]))
        plan.append((kind, size(0.7, 1.0) if kind == "spots" else size(0.15, 0.4), target))

    color = channels == 3 and rng.random() < 0.3
    colors = _intensities(rng, len(plan), channels, color, target)
    structures = tuple(
        _structure(rng, kind, radius, parent, colors[i + 1])
        for i, (kind, radius, parent) in enumerate(plan)
    )
    return SyntheticStyle(
        structures=structures,
        target=target,
        background=colors[0],
        color=color,
        background_texture=(
            float(np.exp(rng.uniform(np.log(0.02), np.log(0.5)))),
            float(rng.uniform(0, 0.12)),
        ),
        blur=float(rng.uniform(0.0, 0.015)),
        bias=float(rng.choice([0.0, rng.uniform(0.05, 0.3)])),
        noise=float(rng.uniform(0.0, 0.05)),
    )


def synthetic_example(
    rng: np.random.Generator, resolution: int, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """One image of a fresh random style: (C, R, R) float32 in [0, 1] and its (R, R) int64 label map
    (0 = background, 1..L the structures)."""
    image, labels = render(sample_style(rng, channels), 1, resolution, rng)
    return image[0].numpy(), labels[0].numpy()


def synthetic_task(
    rng: np.random.Generator,
    resolution: int,
    num_examples: int,
    channels: int = 3,
    name: str = "synthetic",
) -> ArrayTask:
    """A task of `num_examples` examples from one random style, masks = the style's target
    structure.

    Images (N, C, R, R) float32 in [0, 1], masks (N, R, R) bool, every mask non-empty; group
    'synthetic'.
    """
    while True:
        style = sample_style(rng, channels)
        images, labels = render(style, num_examples, resolution, rng)
        masks = labels == style.target + 1
        for _ in range(4):
            empty = torch.nonzero(~masks.flatten(1).any(dim=1))[:, 0]
            if empty.numel() == 0:
                return ArrayTask(name, "synthetic", images.numpy(), masks.numpy())
            more_images, more_labels = render(style, int(empty.numel()), resolution, rng)
            images[empty], masks[empty] = more_images, more_labels == style.target + 1


def phantom_volume(
    rng: np.random.Generator, shape: tuple[int, int, int] = (48, 128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """A 3D phantom: a body with textured soft tissue, a bright spine and vessels, an organ with an
    irregular surface (label 1) and a lesion inside it (label 2). Along axis 0 the organ grows and
    shrinks smoothly and is present on the middle ~60% of slices.

    Returns (volume (D, H, W) float32 in [0, 1], label (D, H, W) uint8).
    """
    depth, height, width = shape
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    axes = [(torch.arange(m, dtype=torch.float32) + 0.5) / m * 2 - 1 for m in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")

    def noise3d(cells: int) -> torch.Tensor:
        coarse = torch.randn((1, 1, cells, cells, cells), generator=gen)
        field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0]
        return (field - field.mean()) / field.std()

    body = (x / 0.9) ** 2 + (y / 0.72) ** 2 <= 1
    spine = ((x / 0.12) ** 2 + ((y - 0.5) / 0.12) ** 2) <= 1
    vessels = ((x + 0.15) / 0.07) ** 2 + ((y - 0.25) / 0.07) ** 2 <= 1
    centre = rng.uniform(-0.08, 0.08, 3) + np.array([0.0, -0.1, 0.25])
    radii = rng.uniform(0.85, 1.15, 3) * np.array([0.6, 0.3, 0.28])
    rho = torch.sqrt(
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    )
    organ = (rho + 0.12 * noise3d(5)) <= 1
    offset = rng.uniform(-0.3, 0.3, 3) * radii
    lesion_r = rng.uniform(0.2, 0.35) * radii
    lesion = organ & (
        (
            ((z - centre[0] - offset[0]) / lesion_r[0]) ** 2
            + ((y - centre[1] - offset[1]) / lesion_r[1]) ** 2
            + ((x - centre[2] - offset[2]) / lesion_r[2]) ** 2
        )
        <= 1
    )

    volume = torch.where(body, 0.35 + 0.05 * noise3d(12), torch.zeros(shape))
    volume = torch.where(vessels & body, torch.full(shape, 0.75), volume)
    volume = torch.where(spine & body, 0.9 + 0.03 * noise3d(20), volume)
    volume = torch.where(organ, 0.55 + 0.04 * noise3d(16), volume)
    volume = torch.where(lesion, torch.full(shape, float(rng.choice([0.2, 0.8]))), volume)
    volume = gaussian_blur(volume[:, None], 0.6)[:, 0] + 0.02 * torch.randn(shape, generator=gen)
    label = organ.to(torch.uint8) + lesion.to(torch.uint8)
    return volume.clamp(0.0, 1.0).numpy(), label.numpy()


def synthetic_volume_task(
    rng: np.random.Generator, resolution: int, depth: int = 32, channels: int = 3
) -> ArrayTask:
    """A task made of the axis-0 slices of a fresh phantom_volume, empty slices included.

    The target is the organ (with its lesion) or the lesion alone, so the model sees volumes in
    which the structure appears, grows, shrinks and is absent. Returns an ArrayTask of `depth`
    examples, images (depth, channels, R, R) float32, group "synthetic_volume".
    """
    volume, labels = phantom_volume(rng, (depth, resolution, resolution))
    target = labels > 0 if rng.random() < 0.7 else labels == 2
    images = np.repeat(volume[:, None], channels, axis=1).astype(np.float32)
    return ArrayTask("synthetic/volume", "synthetic_volume", images, target)
