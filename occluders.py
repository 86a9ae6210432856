"""Occluders and the other outliers drawn over a rendered face, with exact masks.

Paper: Sec. 4 and Supp. B test FOCUS on occluded faces (AR glasses and scarves, CelebA-HQ
with occluders, skin-coloured hands that skin detectors miss); Sec. 3 calls everything the
face model cannot explain an outlier. `data.SyntheticFaces` renders a face and calls this
module to paint the rest of the picture, in three kinds:

1. Occluder families (`OCCLUDERS`), each a function returning (mask (H, W) bool, colour
   (3, H, W)): glasses and sunglasses (built in 3D in front of the eyes and projected with
   the face's pose: frame, lenses, temples), a scarf over mouth and chin (a 3D band from ear
   to ear), a skin-coloured hand, hair fringes and locks, hand-held objects (microphone,
   phone) and random textured shapes. `draw_occluder` picks one by name; `paste_occluder`
   pastes one on any face image, a photo included (photos.py).
2. Unexplainable face parts (`FACE_PARTS`: make-up, beard, pigment, specular highlights),
   painted on the face pixels only. They are outliers the model cannot explain but stay face
   in the ground truth, so they live next to the occluders and are drawn with the same tools.
3. Backgrounds (`background`): gradients, smooth noise, blocks or textures.

The drawing primitives underneath are small pure functions of a pixel grid (`Canvas`):
polygons (even-odd rule), distances to segments and polylines, ellipses, superellipses,
fractal noise, random colours and procedural textures (optionally scikit-image's CC0 example
images, `texture_kinds`). Placement uses a face frame (`Face`, from the 68 landmarks: origin
between the eyes, unit = eye-to-mouth distance) and, for the 3D families, the face's
model-space vertices and pose (`Scene`).

Conventions (H x W image): images (3, H, W) float32 in [0, 1]; masks (H, W) bool; points
(N, 2) pixel coordinates, x right, y down, pixel centres at integers (the renderer's
convention); model-space points (N, 3) mm. Every random number comes from the numpy
Generator passed in (`rng`), drawn in a fixed order, and per-pixel noise from a CPU torch
generator seeded from it (`torch_generator`), so a drawing is the same on every device.

Deviations from the paper: the paper's test sets are photographs with real occluders (AR,
CelebA-HQ); here the occluders are procedural, with exact masks (data.py says why the data
is synthetic).

`python data.py show` draws a contact sheet of them; `python -m pytest -q tests/test_data.py
tests/test_photos.py` tests this module (through `SyntheticFaces` and `paste_occluder`).
"""
import functools
import importlib.util
import math
from typing import NamedTuple, Tuple

import numpy as np
import torch
import torch.nn.functional as nnf

import renderer

OCCLUDERS = ("glasses", "sunglasses", "scarf", "hand", "hair", "object", "texture")
FACE_PARTS = ("makeup", "beard", "pigment", "specular")  # unexplainable, still face
TEXTURE_CHOICES = ("procedural", "skimage", "auto")  # which textures exist (`texture_kinds`)
# scikit-image's CC0 example images used as textures when textures is "skimage" or "auto"
SKIMAGE_TEXTURES = ("brick", "grass", "gravel", "coffee", "chelsea")


# ----------------------------------------------------------------------------- drawing helpers

def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A CPU torch generator seeded from rng (per-pixel noise is drawn on the CPU, so a
    sample is the same on every device)."""
    return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


class Canvas(NamedTuple):
    """Pixel-centre coordinates of an H x W image on a device."""
    xs: torch.Tensor  # (H, W) x of each pixel centre
    ys: torch.Tensor  # (H, W) y of each pixel centre


def make_canvas(height: int, width: int, device) -> Canvas:
    """The pixel-centre grid of an H x W image (x, y = 0 .. W-1, 0 .. H-1)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    return Canvas(xs, ys)


def _polygon(canvas: Canvas, points: torch.Tensor) -> torch.Tensor:
    """Pixel centres inside a closed polygon (even-odd rule). points (P, 2) px. Returns (H, W) bool."""
    H, W = canvas.xs.shape
    points = points.to(canvas.xs.device, torch.float32)
    inside = torch.zeros(H, W, dtype=torch.bool, device=canvas.xs.device)
    # only the pixels of the polygon's bounding box can be inside
    x_lo, y_lo = max(0, math.ceil(float(points[:, 0].min()))), max(0, math.ceil(float(points[:, 1].min())))
    x_hi = min(W - 1, math.floor(float(points[:, 0].max())))
    y_hi = min(H - 1, math.floor(float(points[:, 1].max())))
    if x_lo > x_hi or y_lo > y_hi:
        return inside
    xs, ys = canvas.xs[y_lo:y_hi + 1, x_lo:x_hi + 1], canvas.ys[y_lo:y_hi + 1, x_lo:x_hi + 1]  # (h, w)
    x0, y0 = points[:, 0, None, None], points[:, 1, None, None]  # (P, 1, 1)
    p1 = torch.roll(points, -1, 0)
    x1, y1 = p1[:, 0, None, None], p1[:, 1, None, None]
    # edge (x0, y0) -> (x1, y1) crosses the horizontal ray to the right of the pixel centre
    straddles = (y0 > ys) != (y1 > ys)  # (P, h, w)
    x_cross = x0 + (ys - y0) * (x1 - x0) / torch.where(y1 == y0, torch.ones_like(y1), y1 - y0)
    inside[y_lo:y_hi + 1, x_lo:x_hi + 1] = ((straddles & (xs < x_cross)).sum(0) % 2) == 1
    return inside  # (H, W)


def _segment_distance(canvas: Canvas, a, b) -> torch.Tensor:
    """Distance (H, W) from each pixel centre to the segment a-b (2-sequences, px)."""
    ax, ay, bx, by = float(a[0]), float(a[1]), float(b[0]), float(b[1])
    dx, dy = bx - ax, by - ay
    # t = clamp(((p - a) . (b - a)) / |b - a|^2, 0, 1), distance |p - a - t (b - a)|
    t = (((canvas.xs - ax) * dx + (canvas.ys - ay) * dy) / max(dx * dx + dy * dy, 1e-9)).clamp(0, 1)
    return torch.hypot(canvas.xs - ax - t * dx, canvas.ys - ay - t * dy)  # (H, W)


def _polyline_distance(canvas: Canvas, points) -> torch.Tensor:
    """Distance (H, W) to an open polyline of points (P, 2) px."""
    distances = [_segment_distance(canvas, a, b) for a, b in zip(points[:-1], points[1:])]
    return torch.stack(distances).min(0).values  # (H, W)


def _ellipse(canvas: Canvas, centre, radii, angle: float = 0.0) -> torch.Tensor:
    """Normalised radius (H, W): < 1 inside the ellipse with semi-axes radii rotated by angle."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = canvas.xs - float(centre[0]), canvas.ys - float(centre[1])
    # coordinates along the rotated axes, divided by the semi-axes
    u, v = (c * dx + s * dy) / float(radii[0]), (-s * dx + c * dy) / float(radii[1])
    return torch.hypot(u, v)  # (H, W)


def _superellipse(centre, half_width: float, half_height: float, power: float, n: int = 48):
    """Outline points (n, 2) of |x/w|^p + |y/h|^p = 1 (p = 2 ellipse, larger = boxier)."""
    t = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
    c, s = torch.cos(t), torch.sin(t)
    x = half_width * c.sign() * c.abs() ** (2 / power)
    y = half_height * s.sign() * s.abs() ** (2 / power)
    return torch.stack([x + centre[0], y + centre[1]], 1)  # (n, 2)


def _fractal_noise(rng, height: int, width: int, cells: float, *, octaves: int = 3,
                   device=None) -> torch.Tensor:
    """Smooth random field (H, W) in [0, 1]: bicubic-upsampled random grids, `cells` cells
    across the larger side at the coarsest octave, each octave twice as fine and half as
    strong, normalised to its min and max."""
    g = torch_generator(rng)
    total = torch.zeros(1, 1, height, width)
    for k in range(octaves):
        n = max(2, int(round(cells * 2 ** k)))
        gh, gw = max(2, round(n * height / max(height, width))), max(2, round(n * width / max(height, width)))
        grid = torch.rand(1, 1, gh + 3, gw + 3, generator=g)  # margin: no edge artefacts
        up = nnf.interpolate(grid, size=(height + 3 * height // gh, width + 3 * width // gw),
                             mode="bicubic", align_corners=False)
        total += up[..., :height, :width] / 2 ** k
    total = total[0, 0]
    return ((total - total.min()) / (total.max() - total.min()).clamp(min=1e-6)).to(device)  # (H, W)


def _noise_at(rng, x: torch.Tensor, y: torch.Tensor, cells: Tuple[int, int]) -> torch.Tensor:
    """A smooth random field in [0, 1] at coordinates x, y (H, W), both in [-1, 1] over a
    grid of cells = (columns, rows) random values (bicubic; stretched fields, e.g. hair
    strands, use many columns and few rows)."""
    g = torch_generator(rng)
    grid = torch.rand(1, 1, cells[1], cells[0], generator=g).to(x.device)
    coords = torch.stack([x, y], -1)[None]  # (1, H, W, 2)
    field = nnf.grid_sample(grid, coords, mode="bicubic", padding_mode="border", align_corners=True)
    return field[0, 0].clamp(0, 1)  # (H, W)


def _random_colour(rng, *, saturation=(0.2, 0.9), value=(0.15, 0.95)) -> torch.Tensor:
    """A colour (3,) from a random hue with saturation and value in the given ranges."""
    h, s, v = rng.random(), rng.uniform(*saturation), rng.uniform(*value)
    # HSV to RGB: channel k = v (1 - s clamp(min(t, 4 - t), 0, 1)), t = (5, 3, 1)[k] + 6 h mod 6
    t = (np.array([5.0, 3.0, 1.0]) + 6 * h) % 6
    rgb = v * (1 - s * np.clip(np.minimum(t, 4 - t), 0, 1))
    return torch.tensor(rgb, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _skimage_texture(name: str) -> torch.Tensor:
    """One of scikit-image's CC0 example images as a (3, H, W) float tensor."""
    import skimage.data

    array = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array[:, :, :3].transpose(2, 0, 1)))


def skimage_available() -> bool:
    """Whether scikit-image (the optional textures) is installed."""
    return importlib.util.find_spec("skimage") is not None


def texture_kinds(textures: str) -> Tuple[str, ...]:
    """The texture kinds of a `TEXTURE_CHOICES` option: procedural ones, plus "skimage"."""
    kinds = ("noise", "stripes", "checker", "plaid", "dots")
    if textures == "skimage" or (textures == "auto" and skimage_available()):
        kinds = kinds + ("skimage",)
    return kinds


def _texture(rng, canvas: Canvas, kind: str, scale: float) -> torch.Tensor:
    """A (3, H, W) texture in [0, 1]: two random colours mixed by a pattern of the given
    kind, with features about `scale` px across; "skimage" crops a CC0 example image."""
    H, W = canvas.xs.shape
    device = canvas.xs.device
    a, b = _random_colour(rng).to(device), _random_colour(rng).to(device)
    angle = rng.uniform(0, math.pi)
    # coordinate along a random direction, in periods
    along = (math.cos(angle) * canvas.xs + math.sin(angle) * canvas.ys) / scale  # (H, W)
    across = (-math.sin(angle) * canvas.xs + math.cos(angle) * canvas.ys) / scale
    if kind == "noise":
        mix = _fractal_noise(rng, H, W, max(H, W) / scale, device=device)
    elif kind == "stripes":
        mix = (torch.sin(2 * math.pi * along + rng.uniform(0, 6.3)) > rng.uniform(-0.6, 0.6)).float()
    elif kind == "checker":
        mix = ((torch.floor(along) + torch.floor(across)) % 2).float()
    elif kind == "plaid":
        mix = 0.5 * ((torch.sin(2 * math.pi * along) > 0.3).float()
                     + (torch.sin(2 * math.pi * across) > 0.3).float())
    elif kind == "dots":
        # distance to the nearest grid point, in periods
        spot = torch.hypot(along - torch.round(along), across - torch.round(across))
        mix = (spot < rng.uniform(0.15, 0.4)).float()
    elif kind == "skimage":
        return _skimage_crop(rng, H, W, scale).to(device)
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    return a[:, None, None] + mix * (b - a)[:, None, None]  # (3, H, W)


def _skimage_crop(rng, height: int, width: int, scale: float) -> torch.Tensor:
    """A random window of a scikit-image CC0 texture, resized to (3, H, W), randomly tinted."""
    image = _skimage_texture(str(rng.choice(SKIMAGE_TEXTURES)))  # (3, h, w)
    _, h, w = image.shape
    # a window covering about 4 x (image size / scale) features, at least 32 px
    side = int(min(h, w, max(32, 4 * max(height, width) / scale * 8)))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    window = image[None, :, y0:y0 + side, x0:x0 + side]
    crop = nnf.interpolate(window, size=(height, width), mode="bilinear", align_corners=False)[0]
    tint = torch.tensor(rng.uniform(0.6, 1.2, 3), dtype=torch.float32)[:, None, None]
    return (crop * tint).clamp(0, 1)  # (3, H, W)


# ----------------------------------------------------------------------------- the face frame

class Face(NamedTuple):
    """Where the face is in the image, from its noise-free projected landmarks."""
    lm: torch.Tensor  # (68, 2) px
    origin: torch.Tensor  # (2,) midpoint of the eye centres
    ex: torch.Tensor  # (2,) unit vector from the subject's right eye to the left eye
    ey: torch.Tensor  # (2,) unit vector down the face (towards the mouth)
    unit: float  # px, eye-midpoint to mouth-midpoint distance (about 63 px at 224)
    skin: torch.Tensor  # (3,) median rendered colour of the face region


def face_frame(lm: torch.Tensor, image: torch.Tensor, region: torch.Tensor) -> Face:
    """The face frame of landmarks lm (68, 2) px, with the median colour of image (3, H, W)
    inside region (1, H, W)."""
    lm = lm.float().cpu()
    eye_r, eye_l = lm[36:42].mean(0), lm[42:48].mean(0)
    mouth = 0.5 * (lm[48] + lm[54])
    origin = 0.5 * (eye_r + eye_l)
    ex = (eye_l - eye_r) / (eye_l - eye_r).norm().clamp(min=1e-6)
    # ey = ex rotated by +90 degrees in the y-down image plane
    ey = torch.stack([-ex[1], ex[0]])
    unit = float((mouth - origin).norm().clamp(min=4.0))
    pixels = image[:, region[0] > 0.5]  # (3, N)
    skin = pixels.median(1).values.cpu() if pixels.shape[1] else torch.full((3,), 0.6)
    return Face(lm, origin, ex, ey, unit, skin)


def _face_uv(face: Face, canvas: Canvas):
    """Face-frame coordinates (u along the eyes, v down the face) of every pixel, in units."""
    dx = canvas.xs - float(face.origin[0])
    dy = canvas.ys - float(face.origin[1])
    u = (dx * float(face.ex[0]) + dy * float(face.ex[1])) / face.unit  # (H, W)
    v = (dx * float(face.ey[0]) + dy * float(face.ey[1])) / face.unit  # (H, W)
    return u, v


def _to_px(face: Face, u: float, v: float) -> torch.Tensor:
    """Face-frame point (u, v) in units to pixels (2,)."""
    return face.origin + face.unit * (u * face.ex + v * face.ey)


def _lm_uv(face: Face, k: int) -> Tuple[float, float]:
    d = face.lm[k] - face.origin
    return float(d @ face.ex) / face.unit, float(d @ face.ey) / face.unit


def _project(points: torch.Tensor, pose: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Model-space points (N, 3) mm under pose (6,) to pixels (N, 2), as the renderer does."""
    world = renderer.rigid_transform(points[None].float(), pose[None].float())  # (1, N, 3)
    return renderer.project(renderer.world_to_camera(world), height=height, width=width)[0, :, :2]


# ----------------------------------------------------------------------------- backgrounds

def background(rng, canvas: Canvas, kinds: Tuple[str, ...]) -> torch.Tensor:
    """A (3, H, W) background: a colour gradient, smooth noise, blocks, or a texture."""
    H, W = canvas.xs.shape
    device = canvas.xs.device
    kind = str(rng.choice(("gradient", "noise", "blocks", "texture")))
    a = _random_colour(rng, saturation=(0.0, 0.6), value=(0.1, 0.9)).to(device)
    b = _random_colour(rng, saturation=(0.0, 0.6), value=(0.1, 0.9)).to(device)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (math.cos(angle) * canvas.xs / W + math.sin(angle) * canvas.ys / H + 1) / 2  # (H, W)
        image = a[:, None, None] + ramp.clamp(0, 1) * (b - a)[:, None, None]
    elif kind == "noise":
        mix = _fractal_noise(rng, H, W, rng.uniform(2, 6), device=device)
        image = a[:, None, None] + mix * (b - a)[:, None, None]
    elif kind == "blocks":
        image = a[:, None, None].expand(3, H, W).clone()
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.uniform(-0.2, 1.0) * W, rng.uniform(-0.2, 1.0) * H
            w, h = rng.uniform(0.1, 0.6) * W, rng.uniform(0.1, 0.6) * H
            inside = (canvas.xs >= x0) & (canvas.xs < x0 + w) & (canvas.ys >= y0) & (canvas.ys < y0 + h)
            colour = _random_colour(rng, saturation=(0.0, 0.6), value=(0.1, 0.9)).to(device)
            image = torch.where(inside, colour[:, None, None], image)
    else:
        image = _texture(rng, canvas, str(rng.choice(kinds)), rng.uniform(8, 40) * max(H, W) / 224)
    # backgrounds a little dimmer than the face, with soft vignetting
    shade = 1 - 0.3 * ((canvas.xs / W - 0.5) ** 2 + (canvas.ys / H - 0.5) ** 2)  # (H, W)
    return (image * shade * rng.uniform(0.6, 1.0)).clamp(0, 1)  # (3, H, W)


# ----------------------------------------------------------------------------- face parts

def face_parts(rng, image, region, face: Face, canvas: Canvas):
    """Unexplainable face parts on the rendered face: make-up, beard, pigment, specular.

    They change face pixels only (inside `region`) and stay face in the ground truth.
    Returns the new image (3, H, W) and the names of the parts drawn.
    """
    kinds = list(rng.choice(FACE_PARTS, size=int(rng.integers(1, 3)), replace=False))
    u, v = _face_uv(face, canvas)
    for kind in kinds:
        image = {"makeup": _makeup, "beard": _beard, "pigment": _pigment,
                 "specular": _specular}[kind](rng, image, face, canvas, u, v)
    # (the caller keeps these changes inside the face region)
    return image.clamp(0, 1), kinds


def _luminance(image: torch.Tensor) -> torch.Tensor:
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])  # (H, W)


def _paint_on(image, weight, colour) -> torch.Tensor:
    """Paint colour (3,) with weight (H, W) in [0, 1] on skin, keeping its shading: the
    colour is scaled by the pixel's luminance relative to the skin's."""
    shading = (_luminance(image) / 0.55).clamp(0, 1.6)  # (H, W)
    painted = colour[:, None, None] * shading  # (3, H, W)
    return image + weight * (painted - image)


def _makeup(rng, image, face, canvas, u, v):
    device = image.device
    kind = str(rng.choice(("eyeshadow", "lipstick", "blush", "facepaint")))
    colour = _random_colour(rng, saturation=(0.5, 1.0), value=(0.3, 1.0)).to(device)
    if kind == "eyeshadow":
        weight = torch.zeros_like(u)
        for eye in (range(36, 42), range(42, 48)):
            cu, cv = np.mean([_lm_uv(face, k) for k in eye], 0)
            r = torch.hypot((u - cu) / 0.27, (v - cv + 0.1) / 0.13)  # (H, W)
            weight = torch.maximum(weight, (1.3 - r).clamp(0, 1))
        return _paint_on(image, 0.75 * weight, colour)
    if kind == "lipstick":
        lips = _polygon(canvas, face.lm[48:60]).float()
        colour = colour * torch.tensor([1.0, 0.35, 0.6], device=device) if rng.random() < 0.5 else colour
        return _paint_on(image, 0.85 * lips, colour)
    if kind == "blush":
        weight = torch.zeros_like(u)
        for side in (-1, 1):
            r = torch.hypot((u - side * 0.75) / 0.35, (v - 0.55) / 0.25)
            weight = torch.maximum(weight, (1 - r).clamp(0, 1))
        return _paint_on(image, 0.6 * weight, colour)
    # face paint: two or three bold stripes across one cheek
    side = rng.choice([-1, 1])
    weight = torch.zeros_like(u)
    for k in range(int(rng.integers(2, 4))):
        centre = (side * 0.8, 0.3 + 0.22 * k)
        weight = torch.maximum(weight, ((0.06 - (v - centre[1] - 0.25 * (u - centre[0])).abs()) > 0).float()
                               * ((u - centre[0]).abs() < 0.35).float())
    return _paint_on(image, 0.9 * weight, colour)


def _beard(rng, image, face, canvas, u, v):
    """Stubble or beard: dark hair texture below the nose and around the mouth."""
    H, W = u.shape
    device = image.device
    nose_v = _lm_uv(face, 33)[1]
    lips = _polygon(canvas, face.lm[48:60]).float()
    # where a beard grows: below the nose, not on the lips; denser towards the chin
    grow = ((v - nose_v - 0.05) / 0.1).clamp(0, 1) * (1 - lips) * rng.uniform(0.5, 1.0)  # (H, W)
    hairs = _fractal_noise(rng, H, W, max(H, W) / 2.5, octaves=1, device=device)
    density = rng.uniform(0.3, 0.75)
    strands = (hairs > 1 - density).float()
    colour = torch.tensor(rng.choice([(0.05, 0.04, 0.03), (0.2, 0.12, 0.06), (0.45, 0.3, 0.15),
                                      (0.5, 0.5, 0.5)]), dtype=torch.float32, device=device)
    shade = _luminance(image).clamp(0.2, 1.2)  # keep the light on the hair
    return image + grow * strands * (colour[:, None, None] * shade - image)


def _pigment(rng, image, face, canvas, u, v):
    """Moles, freckles or a birthmark."""
    device = image.device
    kind = str(rng.choice(("moles", "freckles", "birthmark")))
    brown = torch.tensor([0.32, 0.18, 0.1], device=device) * rng.uniform(0.6, 1.3)
    if kind == "birthmark":
        cu, cv = rng.uniform(-1.0, 1.0), rng.uniform(-0.6, 1.4)
        H, W = u.shape
        wobble = 0.7 * _fractal_noise(rng, H, W, 6, octaves=2, device=device)
        r = torch.hypot((u - cu) / rng.uniform(0.1, 0.3), (v - cv) / rng.uniform(0.1, 0.3))  # (H, W)
        inside = (r < 0.6 + wobble).float()
        red = torch.tensor([0.55, 0.2, 0.2], device=device)
        return _paint_on(image, 0.55 * inside, red if rng.random() < 0.5 else brown)
    if kind == "moles":
        count, radius, spread = int(rng.integers(1, 5)), (0.02, 0.045), (1.1, 1.0)
    else:
        count, radius, spread = int(rng.integers(30, 90)), (0.008, 0.02), (0.65, 0.35)
    weight = torch.zeros_like(u)
    for _ in range(count):
        cu, cv = rng.normal(0, spread[0]), 0.45 + rng.normal(0, spread[1])
        r = torch.hypot(u - cu, v - cv) / rng.uniform(*radius)
        weight = torch.maximum(weight, (1.5 - r).clamp(0, 1))
    return _paint_on(image, 0.85 * weight, brown)


def _specular(rng, image, face, canvas, u, v):
    """White specular highlights on the nose, forehead and cheekbones (additive)."""
    spots = [(0.0, _lm_uv(face, 30)[1]), (rng.uniform(-0.4, 0.4), -0.8),
             (-0.65, 0.25), (0.65, 0.25), (0.0, _lm_uv(face, 28)[1])]
    light = torch.zeros_like(u)
    for k in rng.choice(len(spots), size=int(rng.integers(1, 4)), replace=False):
        cu, cv = spots[k]
        sigma = rng.uniform(0.04, 0.12)
        # a Gaussian highlight exp(-r^2 / (2 sigma^2)) stretched along u
        r2 = ((u - cu) / (1.6 * sigma)) ** 2 + ((v - cv) / sigma) ** 2  # (H, W)
        light = light + rng.uniform(0.3, 0.8) * torch.exp(-0.5 * r2)
    return image + light[None]


# ----------------------------------------------------------------------------- occluders

class Scene(NamedTuple):
    """What an occluder family may look at to place itself."""
    face: Face
    canvas: Canvas
    region: torch.Tensor  # (1, H, W) rendered face region
    vertices: torch.Tensor  # (V, 3) model space, mm (CPU)
    landmark_ids: torch.Tensor  # (68,) vertex ids
    pose: torch.Tensor  # (6,)
    kinds: Tuple[str, ...]  # texture kinds available


def draw_occluder(rng, family: str, image: torch.Tensor, scene: Scene):
    """One occluder: returns (mask (H, W) bool, colour (3, H, W)); it is pasted where mask is."""
    draw = {"glasses": functools.partial(_glasses, sun=False),
            "sunglasses": functools.partial(_glasses, sun=True), "scarf": _scarf, "hand": _hand,
            "hair": _hair, "object": _object, "texture": _textured_shapes}[family]
    return draw(rng, image, scene)


def paste_occluder(image: torch.Tensor, landmarks: torch.Tensor, region: torch.Tensor,
                   vertices: torch.Tensor, landmark_ids: torch.Tensor, pose: torch.Tensor,
                   family: str, *, seed: int, noise: float = 0.01):
    """Paste one occluder of `family` (`OCCLUDERS`) on any face image, a photo included,
    placed as on the synthetic faces: from the face's 68 landmarks and a 3D fit of it (its
    vertices, pose and rendered region, e.g. from `fit.fit` on the clean image).

    Args:
        image: (3, H, W) in [0, 1].
        landmarks: (68, 2) px.
        region: (1, H, W) the fitted face's rendered region.
        vertices: (V, 3) the fitted model-space shape; landmark_ids (68,) its landmark ids.
        pose: (6,) the fitted pose.
        seed: the occluder's random draw.
    Returns:
        (occluded image (3, H, W), occluder mask (1, H, W) float in {0, 1}).
    """
    if family not in OCCLUDERS:
        raise ValueError(f"family must be one of {OCCLUDERS}, got {family!r}")
    H, W = image.shape[-2:]
    image, region = image.detach().float().cpu(), region.detach().float().cpu()
    rng = np.random.default_rng(seed)
    scene = Scene(face_frame(landmarks.detach().cpu(), image, region), make_canvas(H, W, "cpu"),
                   region, vertices.detach().float().cpu(), landmark_ids.cpu(),
                   pose.detach().float().cpu(), texture_kinds("procedural"))
    mask, colour = draw_occluder(rng, family, image, scene)
    g = torch.Generator().manual_seed(seed)
    colour = (colour + noise * torch.randn(3, H, W, generator=g)).clamp(0.01, 0.99)
    return torch.where(mask, colour, image), mask[None].float()


def _glasses(rng, image, scene: Scene, *, sun: bool):
    """Glasses (frame only) or sunglasses (dark lenses), built in 3D in front of the eyes
    and projected with the sample's pose: the frame's shape, its material, then the lenses."""
    H, W = scene.canvas.xs.shape
    frame, lens = _glasses_frame(rng, scene, sun=sun, device=image.device)
    colour = _frame_colour(rng, H, W, image.device)
    if not sun:
        return frame, colour
    return frame | lens, torch.where(frame, colour, _sun_lenses(rng, image, scene))


def _glasses_frame(rng, scene: Scene, *, sun: bool, device):
    """Rims, bridge and temples of glasses, 3D in mm in front of the eyes, projected.
    Returns (frame (H, W) bool, lens (H, W) bool: inside the rims)."""
    canvas = scene.canvas
    H, W = canvas.xs.shape
    lm3 = scene.vertices[scene.landmark_ids]  # (68, 3)
    project = lambda p: _project(p, scene.pose, H, W).to(device)  # (N, 3) mm -> (N, 2) px
    half_w, half_h = rng.uniform(21, 27), rng.uniform(15, 21) * (1.1 if sun else 1.0)
    power, rim = rng.uniform(2.0, 5.0), rng.uniform(1.8, 3.5)
    depth = float(lm3[36:48, 2].max()) + rng.uniform(10, 16)  # lens plane, mm
    lift = rng.uniform(0, 4)
    frame = torch.zeros(H, W, dtype=torch.bool, device=device)
    lens = torch.zeros_like(frame)
    hinges = []
    for side, eye in ((-1, range(36, 42)), (1, range(42, 48))):
        c = lm3[list(eye)].mean(0)
        centre = (float(c[0]) + side * 2.0, float(c[1]) + lift)
        for grow, target in ((rim, frame), (0.0, lens)):
            outline = _superellipse(centre, half_w + grow, half_h + grow, power)  # (n, 2)
            points = torch.cat([outline, torch.full((outline.shape[0], 1), depth)], 1)  # (n, 3)
            target |= _polygon(canvas, project(points))
        hinges.append((centre[0] + side * (half_w + rim / 2), centre[1] + 0.45 * half_h))
    frame &= ~lens  # the rim: outer outline minus the lens
    # px per mm at the lens plane: f / camera depth
    frame_px = renderer.focal_length(H, W) / (renderer.CAMERA_DISTANCE - float(scene.pose[5]) - depth)
    bridge = torch.tensor([[hinges[0][0] + 2 * half_w + rim, hinges[0][1], depth],
                           [0.0, float(lm3[27, 1]) + lift + rng.uniform(0, 5),
                            max(depth, float(lm3[27, 2]) + 5)],
                           [hinges[1][0] - 2 * half_w - rim, hinges[1][1], depth]])
    frame |= _polyline_distance(canvas, project(bridge)) < rim * frame_px / 2
    frame |= _temples(rng, scene, hinges, depth, rim * frame_px / 2, project)
    return frame, lens


def _temples(rng, scene: Scene, hinges, depth: float, half_width: float, project) -> torch.Tensor:
    """Temples from the hinges (x, y mm at the lens plane `depth`) back to the ears, half_width
    px wide on each side, drawn over the face and just beyond its edge (there is no rendered
    head); the one turned away from the camera is hidden. Returns (H, W) bool."""
    canvas = scene.canvas
    reach = max(1, round(0.08 * scene.face.unit))
    near_face = nnf.max_pool2d(scene.region[None], 2 * reach + 1, stride=1, padding=reach)[0, 0] > 0.5
    ears = torch.tensor([[side * rng.uniform(74, 80), hinge[1] - 3, depth - 95]
                         for side, hinge in zip((-1, 1), hinges)])  # (2, 3)
    ear_depth = renderer.rigid_transform(ears[None], scene.pose[None].float())[0, :, 2]  # (2,) world z
    temples = torch.zeros_like(near_face)
    for k, hinge in enumerate(hinges):
        if ear_depth[k] < ear_depth[1 - k] - 40:
            continue
        temple = torch.tensor([[hinge[0], hinge[1], depth], ears[k].tolist()])
        temples |= (_polyline_distance(canvas, project(temple)) < half_width) & near_face
    return temples


def _frame_colour(rng, H: int, W: int, device) -> torch.Tensor:
    """The colour (3, H, W) of a glasses frame: black, metal, tortoiseshell or a flat colour."""
    material = str(rng.choice(("black", "metal", "tortoise", "colour")))
    if material == "black":
        return torch.full((3, H, W), rng.uniform(0.02, 0.12), device=device)
    if material == "metal":
        base = torch.tensor(rng.choice([(0.75, 0.75, 0.78), (0.8, 0.65, 0.3)]), dtype=torch.float32,
                            device=device)
        return base[:, None, None] * (0.55 + 0.45 * _fractal_noise(rng, H, W, 12, device=device))
    if material == "tortoise":
        spots = _fractal_noise(rng, H, W, 20, device=device)
        return torch.tensor([0.35, 0.18, 0.06], device=device)[:, None, None] * (0.3 + spots)
    flat = _random_colour(rng, saturation=(0.5, 1.0), value=(0.3, 0.8)).to(device)
    return flat[:, None, None].expand(3, H, W)


def _sun_lenses(rng, image, scene: Scene) -> torch.Tensor:
    """Dark, slightly see-through sunglass lenses with a diagonal reflection band: the colour
    (3, H, W) of the lens pixels over `image`."""
    device = image.device
    tints = [(0.05, 0.05, 0.05), (0.06, 0.1, 0.06), (0.14, 0.08, 0.04), (0.04, 0.06, 0.14)]
    tint = torch.tensor(rng.choice(tints), dtype=torch.float32, device=device)
    see_through = rng.uniform(0.05, 0.3)
    u, v = _face_uv(scene.face, scene.canvas)
    band = 0.25 * torch.exp(-0.5 * ((u + v - rng.uniform(-0.6, 0.2)) / 0.12) ** 2)  # (H, W)
    return see_through * image + (1 - see_through) * tint[:, None, None] + band


def _scarf(rng, image, scene: Scene):
    """A scarf over mouth and chin: a 3D band from ear to ear below the nose, projected,
    extending down out of the image; knitted, striped, plaid or plain, with folds."""
    face, canvas = scene.face, scene.canvas
    H, W = canvas.xs.shape
    device = image.device
    lm3 = scene.vertices[scene.landmark_ids].double()  # (68, 3)
    top_mid = float(rng.uniform(lm3[33, 1] - 8, lm3[30, 1] + 2))  # y of the top edge, mm
    side_y = float(rng.uniform(lm3[2, 1] - 10, lm3[1, 1] + 5))
    half = float(lm3[16, 0] - lm3[0, 0]) / 2 + rng.uniform(8, 16)
    front, back = float(lm3[33, 2]) + rng.uniform(8, 14), float(lm3[2, 2]) + 5
    s = torch.linspace(-1, 1, 25, dtype=torch.float64)
    # a gently wavy edge: a random sinusoid plus a little jitter, mm
    wave = torch.from_numpy(rng.uniform(1, 4) * np.sin(rng.uniform(2, 7) * s.numpy() + rng.uniform(0, 6.3))
                            + rng.uniform(-0.7, 0.7, 25))
    # top edge: a parabola from the cheeks up to below the nose, wrapping back to the sides
    top = torch.stack([s * half, top_mid + (side_y - top_mid) * s ** 2 + wave,
                       front + (back - front) * s ** 2], 1)  # (25, 3)
    chin_y = float(lm3[8, 1]) - 220
    bottom = torch.tensor([[half + 25, chin_y, back - 30], [0.0, chin_y, front],
                           [-half - 25, chin_y, back - 30]], dtype=torch.float64)
    outline = _project(torch.cat([top, bottom]).float(), scene.pose, H, W).to(device)
    mask = _polygon(canvas, outline)
    kind = str(rng.choice(("plain", "stripes", "plaid", "knit") + scene.kinds))
    u, v = _face_uv(face, canvas)
    if kind in ("plain", "knit"):
        base = _random_colour(rng).to(device)[:, None, None].expand(3, H, W)
        pattern = (0.85 + 0.15 * torch.sin(2 * math.pi * u / 0.05).abs()) if kind == "knit" else 1.0
        colour = base * pattern
    elif kind in ("stripes", "plaid"):
        a, b = _random_colour(rng).to(device), _random_colour(rng).to(device)
        period = rng.uniform(0.12, 0.4)
        mix = (torch.sin(2 * math.pi * v / period) > 0).float()
        if kind == "plaid":
            mix = 0.5 * (mix + (torch.sin(2 * math.pi * u / period) > 0).float())
        colour = a[:, None, None] + mix * (b - a)[:, None, None]
    else:
        colour = _texture(rng, canvas, kind, rng.uniform(0.08, 0.3) * face.unit)
    # folds: soft horizontal ridges that bend with the cloth; dimmed like the face
    bend = 0.15 * _fractal_noise(rng, H, W, 3, device=device)
    folds = 0.8 + 0.2 * torch.sin(2 * math.pi * (v + bend) / rng.uniform(0.2, 0.4)).abs()
    light = float(_luminance(face.skin[:, None, None])[0, 0]) / 0.55
    return mask, (colour * folds * min(max(light, 0.4), 1.3)).clamp(0, 1)


def _hand(rng, image, scene: Scene):
    """A hand-like skin-coloured shape (palm, four fingers, thumb, forearm) over the mouth,
    a cheek, an eye or the chin, coloured like the face's own skin under the scene's light."""
    face, canvas = scene.face, scene.canvas
    device = image.device
    target = str(rng.choice(("mouth", "cheek", "eye", "chin")))
    cheek = face.lm[int(rng.choice([3, 13]))] * 0.6 + face.origin * 0.4
    eye = face.lm[36:42].mean(0) if rng.random() < 0.5 else face.lm[42:48].mean(0)
    anchor = {"mouth": 0.5 * (face.lm[48] + face.lm[54]), "cheek": cheek, "eye": eye,
              "chin": face.lm[8]}[target]
    d = face.unit * rng.uniform(0.85, 1.15)
    # fingers point along `up`: from below or from a side, towards the anchor
    angle = math.atan2(float(-face.ey[1]), float(-face.ey[0])) + rng.uniform(-1.0, 1.0)
    up = torch.tensor([math.cos(angle), math.sin(angle)])
    right = torch.tensor([-up[1], up[0]])
    palm = anchor - up * d * rng.uniform(0.2, 0.9) + right * d * rng.normal(0, 0.2)
    # interior-ness per part: 1 - distance / radius, so that touching parts show a crease
    parts = []
    parts.append(1 - _ellipse(canvas, palm, (0.55 * d, 0.62 * d), angle))  # palm
    wrist_end = palm - up * 4 * d
    parts.append(1 - _segment_distance(canvas, palm - up * 0.3 * d, wrist_end) / (0.42 * d))  # forearm
    spread = rng.uniform(0.0, 0.15)
    for k, (offset, length) in enumerate(zip((-0.36, -0.12, 0.12, 0.36), (0.7, 0.85, 0.8, 0.6))):
        bend = (k - 1.5) * spread
        direction = up * math.cos(bend) + right * math.sin(bend)
        base = palm + up * 0.45 * d + right * offset * d
        tip = base + direction * length * d * rng.uniform(0.9, 1.1)
        parts.append(1 - _segment_distance(canvas, base, tip) / (0.11 * d))
    thumb_side = rng.choice([-1, 1])
    thumb_base = palm + right * thumb_side * 0.4 * d
    thumb_dir = up * 0.6 + right * thumb_side * 0.8
    parts.append(1 - _segment_distance(canvas, thumb_base, thumb_base + thumb_dir * 0.6 * d) / (0.13 * d))
    inside = torch.stack(parts).max(0).values  # (H, W) > 0 inside the hand
    mask = inside > 0
    # skin colour: the face's rendered median, slightly varied; rounded shading per part
    skin = face.skin.to(device) * torch.tensor(rng.uniform(0.9, 1.1, 3), dtype=torch.float32, device=device)
    shading = 0.75 + 0.35 * inside.clamp(0, 1).sqrt()
    return mask, (skin[:, None, None] * shading).clamp(0, 1)


def _hair(rng, image, scene: Scene):
    """A hair fringe from the top of the head down over the forehead (sometimes the eyes),
    with optional locks along the sides of the face; strands run down the face."""
    face, canvas = scene.face, scene.canvas
    device = image.device
    u, v = _face_uv(face, canvas)
    brow_v = float(np.mean([_lm_uv(face, k)[1] for k in range(17, 27)]))
    left, right = _lm_uv(face, 0)[0], _lm_uv(face, 16)[0]
    # strand coordinate: u, bent by a random sweep that grows down the fringe
    sweep = rng.uniform(-0.5, 0.5)
    s = u + sweep * (v - brow_v + 1.2).clamp(min=0) ** 2 / 2
    # the tips: from mid-forehead to over the eyes, in uneven pointed clumps
    clumps = _noise_at(rng, (s / 3).clamp(-1, 1), torch.zeros_like(s), (int(rng.integers(8, 20)), 2))
    tip = brow_v + rng.uniform(-0.45, 0.4) + 0.12 * sweep * u + rng.uniform(0.1, 0.35) * clumps ** 2
    head = torch.hypot(u / ((right - left) / 2 + 0.25), (v + 1.1) / 1.45) < 1  # (H, W) the skull
    mask = head & (v < tip)
    for side, jaw in ((-1, list(range(0, 6))), (1, list(range(16, 10, -1)))):
        if rng.random() < 0.6:
            # a lock hanging along the side of the face, over its edge
            reach = int(rng.integers(2, 6))
            edge = face.lm[jaw[:reach + 1]] + side * face.ex * face.unit * rng.uniform(0.0, 0.15)
            top = _to_px(face, side * ((right - left) / 2 + 0.1), brow_v - 0.6)
            distance = _polyline_distance(canvas, torch.cat([top[None], edge]))  # (H, W)
            lock = distance < face.unit * rng.uniform(0.12, 0.3)
            mask |= lock
    # strands: a field with many columns across the strands and few along them
    strands = _noise_at(rng, (s / 3).clamp(-1, 1), (v / 3).clamp(-1, 1), (int(rng.integers(150, 300)), 6))
    base = torch.tensor(rng.choice([(0.05, 0.04, 0.035), (0.2, 0.12, 0.07), (0.35, 0.22, 0.12),
                                    (0.75, 0.6, 0.35), (0.5, 0.2, 0.08), (0.55, 0.55, 0.55)]),
                        dtype=torch.float32, device=device) * rng.uniform(0.8, 1.2)
    sheen = 1 + 0.35 * torch.exp(-0.5 * ((v - brow_v + rng.uniform(0.3, 0.8)) / 0.15) ** 2)
    colour = base[:, None, None] * (0.55 + 0.7 * strands) * sheen
    return mask, colour.clamp(0, 1)


def _object(rng, image, scene: Scene):
    """A hand-held object near the face: a microphone or a phone."""
    face, canvas = scene.face, scene.canvas
    H, W = canvas.xs.shape
    device = image.device
    d = face.unit
    if rng.random() < 0.5:
        # microphone: a meshed ball in front of the mouth on a dark handle going out of view
        mouth = 0.5 * (face.lm[48] + face.lm[54])
        centre = mouth + d * (rng.uniform(-0.5, 0.5) * face.ex + rng.uniform(0.1, 0.6) * face.ey)
        radius = d * rng.uniform(0.25, 0.38)
        angle = math.atan2(float(face.ey[1]), float(face.ey[0])) + rng.uniform(-0.9, 0.9)
        end = centre + 6 * d * torch.tensor([math.cos(angle), math.sin(angle)])
        handle = _segment_distance(canvas, centre, end) < 0.35 * radius
        r = _ellipse(canvas, centre, (radius, radius))  # (H, W)
        ball = r < 1
        mesh = torch.maximum(torch.sin((canvas.xs + canvas.ys) * 2.2 / max(1.0, d / 40)).abs(),
                             torch.sin((canvas.xs - canvas.ys) * 2.2 / max(1.0, d / 40)).abs())
        grey = rng.uniform(0.35, 0.6)
        ball_colour = grey * (0.65 + 0.35 * (mesh < 0.9).float()) * (1 - 0.4 * r.clamp(0, 1) ** 2)
        # a dark handle, lighter along its axis
        axis = 1 - _segment_distance(canvas, centre, end) / (0.35 * radius)  # (H, W)
        handle_colour = rng.uniform(0.04, 0.2) * (1 + 0.3 * axis)
        colour = torch.where(ball, ball_colour, handle_colour).expand(3, H, W)
        return ball | handle, colour
    # phone: a rounded rectangle at one side of the face, body and screen
    side = rng.choice([-1, 1])
    centre = _to_px(face, side * rng.uniform(0.6, 1.1), rng.uniform(-0.1, 0.6))
    width, height = d * rng.uniform(0.7, 0.85), d * rng.uniform(1.4, 1.7)
    angle = rng.uniform(-0.5, 0.5) + math.atan2(float(face.ex[1]), float(face.ex[0]))
    c, s = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[c, -s], [s, c]])
    body = _polygon(canvas, _superellipse((0, 0), width / 2, height / 2, 8) @ rotate.T + centre)
    screen_outline = _superellipse((0, 0), width / 2 - 0.06 * d, height / 2 - 0.12 * d, 10)
    screen = _polygon(canvas, screen_outline @ rotate.T + centre)
    body_colour = _random_colour(rng, saturation=(0.0, 0.5), value=(0.05, 0.9)).to(device)
    glow = _texture(rng, canvas, "noise", 0.3 * d) * 0.6 + 0.2
    colour = torch.where(screen, glow, body_colour[:, None, None].expand(3, H, W))
    return body, colour


def _textured_shapes(rng, image, scene: Scene):
    """One to three random shapes (star polygon, ellipse, rectangle, noisy blob) with
    procedural textures, near random landmarks."""
    face, canvas = scene.face, scene.canvas
    H, W = canvas.xs.shape
    device = image.device
    mask = torch.zeros(H, W, dtype=torch.bool, device=device)
    colour = torch.zeros(3, H, W, device=device)
    for _ in range(int(rng.integers(1, 4))):
        centre = face.lm[int(rng.integers(68))] + torch.from_numpy(rng.normal(0, 0.25 * face.unit, 2)).float()
        size = face.unit * rng.uniform(0.3, 0.9)
        angle = rng.uniform(0, math.pi)
        kind = str(rng.choice(("star", "ellipse", "rectangle", "blob")))
        if kind == "star":
            n = int(rng.integers(5, 12))
            t = torch.linspace(0, 2 * math.pi, n + 1)[:-1] + angle
            radius = size * torch.from_numpy(rng.uniform(0.4, 1.0, n)).float()
            shape = _polygon(canvas, torch.stack([torch.cos(t), torch.sin(t)], 1) * radius[:, None] + centre)
        elif kind == "ellipse":
            shape = _ellipse(canvas, centre, (size, size * rng.uniform(0.3, 1.0)), angle) < 1
        elif kind == "rectangle":
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = canvas.xs - float(centre[0]), canvas.ys - float(centre[1])
            aspect = rng.uniform(0.2, 0.8)
            shape = ((c * dx + s * dy).abs() < size) & ((-s * dx + c * dy).abs() < size * aspect)
        else:
            wobble = _fractal_noise(rng, H, W, max(H, W) / size * 1.5, octaves=2, device=device)
            shape = _ellipse(canvas, centre, (size, size)) < 0.6 + 0.6 * wobble
        texture = _texture(rng, canvas, str(rng.choice(scene.kinds)), rng.uniform(0.05, 0.3) * face.unit)
        colour = torch.where(shape, texture, colour)
        mask |= shape
    return mask, colour
