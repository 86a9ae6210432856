"""The embedded toy face model, built in code, and `make_albedo`, the albedo model of any mesh.

The paper (Sec. 4.1) uses the Basel Face Model 2017, which cannot be shipped. This module
builds a stand-in with the same interface (a `bfm.MorphableModel` with 80 identity, 64
expression and 80 albedo modes, 68 landmarks), deterministically, in about a second
(`toy_face_model`; `face_models.load_face_model("toy")` is the usual way to get it):

- Mean shape: a height field z(x, y) of smooth bumps (forehead, brow ridge, eye sockets and
  eyeballs, nose bridge, tip and wings, cheekbones, lips and mouth line, chin, jaw) over an
  n x n parametric grid bounded by a face outline (n rows; n columns, or n + 1 when n is even
  so that x = 0 is a column), quads split in two. Resolution n gives V = n * n (odd n) or
  n * (n + 1) vertices and F = 2 (n - 1)(columns - 1) triangles: n = 64: 4,160 / 8,064;
  n = 133: 17,689 / 34,848; n = 188: 35,532 / 70,312 (the BFM 2017 face crop has about 35k
  vertices and 70k triangles). Exactly mirror symmetric (`bfm.mirror_permutation`). In the
  model-space convention of `bfm.py` it spans x in [-74, 74], y in [-79, 119] (chin to upper
  forehead), z in [0, 95].
- Identity: 80 smooth mirror-equivariant Gaussian-process modes (Nystroem), about 3.3 mm rms
  per std for the top mode.
- Expression: 64 localized modes (jaw, lips, smiles, brows, eyes, cheeks, ..., then smooth
  local bumps; `model.exp_names`): jaw open 11 mm at the chin per std, 1.5-5 mm for the others.
- Landmarks: the vertex nearest (in x, y) to fixed target points, so they sit at the same
  place at every resolution.
- Albedo: `make_albedo`, which `face_models.py` also applies to loaded meshes without one.

Conventions as in `bfm.py` (shape letters V vertices, K modes, M inducing points; mm).

Deviations from the paper:
- Identity modes are a Gaussian process, not learned from scans; expressions are hand-made
  localized deformations.
- Models without an albedo model (toy, ICT, npz without albedo) get `make_albedo`: a painted
  mean (skin, darker brows, red lips, eyes, nostrils) plus 80 Gaussian-process colour modes.

Run `python face_models.py toy` to build the toy model and print its summary;
`python -m pytest -q tests/test_toy_face.py` tests this module.
"""
import math

import numpy as np
import torch

from bfm import (LANDMARK_MIRROR, THETA_SIZES, MorphableModel, center_behind_nose, check_array,
                 check_ids, to_long, to_numpy)

# ----------------------------------------------------------------------------- bumps, kernels, eigen-pairs

def _gauss(x, y, x0, y0, sx, sy):
    """Unnormalized 2D Gaussian bump exp(-((x-x0)^2/sx^2 + (y-y0)^2/sy^2) / 2)."""
    return torch.exp(-0.5 * (((x - x0) / sx) ** 2 + ((y - y0) / sy) ** 2))


def _pair(x, y, x0, y0, sx, sy):
    """A Gaussian bump at (x0, y0) plus its mirror image at (-x0, y0): smooth at x = 0 and
    exactly mirror symmetric in floating point."""
    return _gauss(x, y, x0, y0, sx, sy) + _gauss(x, y, -x0, y0, sx, sy)


def _se_kernel(a: torch.Tensor, b: torch.Tensor, length: float, variances) -> torch.Tensor:
    """Multi-scale squared-exponential kernel k(p, q) = sum_s v_s exp(-|p - q|^2 / (2 l_s^2))
    with length scales l_s = length / 2^s, s = 0, 1, 2, ...

    exp(-d^2 / (2 (l / 2)^2)) = exp(-d^2 / (2 l^2))^4, so one exp serves every scale.

    Args:
        a: (N, 3), b: (M, 3) points, mm. length: l_0, mm. variances: (v_0, v_1, ...).
    Returns:
        (N, M) kernel matrix, in a's dtype.
    """
    # |p - q|^2 = |p|^2 + |q|^2 - 2 p.q
    d2 = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp(min=0)  # (N, M)
    e = torch.exp(d2 * (-0.5 / length ** 2))  # (N, M)
    k = variances[0] * e
    for v in variances[1:]:
        e = e.square().square()  # the next scale, half the length
        k = k + v * e
    return k


def _eig_desc(k: torch.Tensor):
    """Eigen-pairs of a symmetric matrix, largest first, each vector's largest entry positive.

    "Largest" is the first entry (lowest index) within a relative 1e-6 of the largest |u|:
    a mirror-antisymmetric mode has two entries of equal size and opposite sign, and which of
    them rounding makes larger changes with the number of threads LAPACK uses, so a plain
    argmax would flip such modes between machines.
    """
    lam, u = torch.linalg.eigh(k.double())  # ascending
    lam, u = lam.flip(0), u.flip(1)
    size = u.abs()  # (N, M)
    near_max = size >= size.max(dim=0, keepdim=True).values * (1 - 1e-6)  # (N, M)
    first = near_max.double().argmax(dim=0, keepdim=True)  # first True per column, (1, M)
    sign = torch.sign(u.gather(0, first))  # (1, M)
    return lam.clamp(min=0.0), u * sign


def _inducing_points(points: torch.Tensor, cell: float) -> torch.Tensor:
    """Centroids of the points falling in each occupied cube of side `cell` (mm), in a fixed
    order: a deterministic subsample of a surface that barely depends on its resolution.
    Returns (M, 3)."""
    ijk = torch.floor(points / cell).long()  # (V, 3)
    ijk = ijk - ijk.min(0).values
    span = ijk.max(0).values + 1
    key = (ijk[:, 0] * span[1] + ijk[:, 1]) * span[2] + ijk[:, 2]  # (V,)
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], 3, dtype=points.dtype).index_add_(0, inverse, points)
    return sums / counts[:, None].to(points.dtype)  # (M, 3)


# ----------------------------------------------------------------------------- albedo

SKIN = (0.76, 0.57, 0.47)
BROW = (0.27, 0.19, 0.15)
LIP = (0.70, 0.37, 0.36)
MOUTH = (0.30, 0.12, 0.12)
SCLERA = (0.86, 0.84, 0.82)
IRIS = (0.32, 0.21, 0.14)
PUPIL = (0.04, 0.03, 0.03)
NOSTRIL = (0.33, 0.20, 0.18)
ALBEDO_KERNEL = (40.0, (0.7, 0.3))  # length scale mm, variances at 40 and 20 mm: broad + blotchy
ALBEDO_STD = 0.1  # per-channel std of the albedo Gaussian process, [0, 1] units
ALBEDO_CHANNEL_CORR = 0.95  # correlation of the R, G, B variations (mostly brightness)
ALBEDO_CHANNEL_SCALE = (1.0, 0.9, 0.85)  # relative std of R, G, B


def _polygon_signed_distance(points: torch.Tensor, polygon: torch.Tensor) -> torch.Tensor:
    """Signed 2D distance from points to a closed polygon, negative inside.

    Args:
        points: (V, 2). polygon: (P, 2) corners in order.
    Returns:
        (V,) signed distance.
    """
    a, b = polygon, polygon.roll(-1, dims=0)  # (P, 2) edge starts and ends
    ab = b - a  # (P, 2)
    ap = points[:, None, :] - a  # (V, P, 2)
    # closest point on each edge: a + t (b - a), t = clamp(ap . ab / |ab|^2, 0, 1)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-12)).clamp(0, 1)  # (V, P)
    dist = (ap - t[..., None] * ab).norm(dim=-1).min(dim=1).values  # (V,)
    # even-odd rule: count the edges crossed by a ray from the point towards +x
    px, py = points[:, 0:1], points[:, 1:2]  # (V, 1)
    straddles = (a[:, 1] > py) != (b[:, 1] > py)  # (V, P)
    dy = torch.where(ab[:, 1] == 0, torch.ones_like(ab[:, 1]), ab[:, 1])  # (P,)
    x_cross = a[:, 0] + (py - a[:, 1]) * ab[:, 0] / dy  # (V, P)
    inside = (straddles & (px < x_cross)).sum(dim=1) % 2 == 1  # (V,)
    return torch.where(inside, -dist, dist)


def _polyline_distance(points: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
    """3D distance from points (V, 3) to an open polyline (P, 3). Returns (V,)."""
    a, ab = line[:-1], line[1:] - line[:-1]  # (P-1, 3)
    ap = points[:, None, :] - a  # (V, P-1, 3)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-12)).clamp(0, 1)  # (V, P-1)
    return (ap - t[..., None] * ab).norm(dim=-1).min(dim=1).values  # (V,)


def _paint(base: torch.Tensor, mask: torch.Tensor, color) -> torch.Tensor:
    """Blend `color` over base (V, 3) with weights mask (V,) in [0, 1]. Returns (V, 3)."""
    return base + mask[:, None] * (torch.tensor(color, dtype=base.dtype) - base)


def _painted_albedo(p: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Mean albedo painted from the landmarks: skin, blush, brows, lips, mouth, eyes, nostrils.

    Args:
        p: (V, 3) vertices, mm. lm: (68, 3) landmark positions.
    Returns:
        (V, 3) colours.
    """
    V = p.shape[0]
    xy = p[:, :2]  # (V, 2)
    color = torch.tensor(SKIN, dtype=p.dtype).expand(V, 3)  # (V, 3)
    # a slight blush on the cheeks, below the outer eye corners
    for eye in (36, 45):
        cheek = lm[eye] + torch.tensor([0.0, -28.0, 0.0], dtype=p.dtype)
        blush = torch.exp(-0.5 * ((p - cheek).norm(dim=-1) / 16.0) ** 2)  # (V,)
        color = _paint(color, 0.25 * blush, LIP)
    # brows: a band about 9 mm wide around each brow's landmark line (17-21, 22-26)
    for ids in (list(range(17, 22)), list(range(22, 27))):
        d = _polyline_distance(p, lm[ids])  # (V,)
        color = _paint(color, 0.85 * torch.sigmoid((4.5 - d) / 1.0), BROW)
    # polygons are tested in the x-y plane; this gate keeps them off surfaces far behind
    front = lambda ids: torch.sigmoid((p[:, 2] - lm[ids, 2].min() + 15.0) / 2.0)  # (V,)
    lips, inner = list(range(48, 60)), list(range(60, 68))
    d_lip = _polygon_signed_distance(xy, lm[lips, :2])  # (V,)
    color = _paint(color, torch.sigmoid(-d_lip / 0.8) * front(lips), LIP)
    d_mouth = _polygon_signed_distance(xy, lm[inner, :2])  # (V,)
    color = _paint(color, torch.sigmoid(-d_mouth / 0.5) * front(inner), MOUTH)
    for ids in (list(range(36, 42)), list(range(42, 48))):
        in_eye = torch.sigmoid((0.3 - _polygon_signed_distance(xy, lm[ids, :2])) / 0.5) * front(ids)  # (V,)
        color = _paint(color, in_eye, SCLERA)
        # iris and pupil: discs at the eye centre, radii relative to the eye width (iris ~ 11 mm)
        r = (xy - lm[ids, :2].mean(0)).norm(dim=-1) / (lm[ids[0], :2] - lm[ids[3], :2]).norm()  # (V,)
        color = _paint(color, torch.sigmoid((0.21 - r) / 0.015) * in_eye, IRIS)
        color = _paint(color, torch.sigmoid((0.09 - r) / 0.012) * in_eye, PUPIL)
    # nostrils: dark spots between the nostril landmarks (31-33, 33-35)
    for a, b in ((31, 33), (33, 35)):
        spot = torch.exp(-0.5 * ((p - 0.5 * (lm[a] + lm[b])).norm(dim=-1) / 2.8) ** 2)  # (V,)
        color = _paint(color, 0.8 * spot, NOSTRIL)
    return color


def _albedo_basis(p: torch.Tensor, num_modes: int) -> torch.Tensor:
    """Albedo Gaussian-process modes, Nystroem approximation (Williams & Seeger 2001).

    The colour field is a GP with covariance k(p, q) C: k the multi-scale squared exponential
    `ALBEDO_KERNEL` on vertex positions, C a 3 x 3 channel covariance (mostly shared
    brightness). Eigen-pairs of k on inducing points P, (lambda_i, u_i), and of C, (mu_j, w_j),
    give the modes b_ij(v) = sqrt(mu_j) w_j k(v, P) u_i / sqrt(lambda_i), largest
    lambda_i mu_j first.

    Args:
        p: (V, 3) float64 vertices. num_modes: K.
    Returns:
        (K, V, 3) float32 basis, one std per mode.
    """
    inducing = _inducing_points(p, 12.0)  # (M, 3)
    lam, u = _eig_desc(_se_kernel(inducing, inducing, *ALBEDO_KERNEL))  # (M,), (M, M)
    s = torch.tensor(ALBEDO_CHANNEL_SCALE, dtype=p.dtype) * ALBEDO_STD  # (3,)
    # C = diag(s) [(1 - rho) I + rho 1 1^T] diag(s)
    corr = (1 - ALBEDO_CHANNEL_CORR) * torch.eye(3, dtype=p.dtype) + ALBEDO_CHANNEL_CORR
    mu, w = _eig_desc(s[:, None] * corr * s[None, :])  # (3,), (3, 3)
    products = (lam[:, None] * mu[None, :]).flatten()  # (3M,), index i * 3 + j
    order = torch.sort(products, descending=True, stable=True).indices[:num_modes]  # (K,)
    i, j = order // 3, order % 3
    # spatial fields k(v, P) u_i / sqrt(lambda_i), in float32 (the V x M part dominates the cost)
    k_vp = _se_kernel(p.float(), inducing.float(), *ALBEDO_KERNEL)  # (V, M)
    fields = k_vp @ (u[:, i] / lam[i].clamp(min=1e-12).sqrt()).float()  # (V, K)
    colours = (mu[j].sqrt()[:, None] * w[:, j].T).float()  # (K, 3)
    return fields.T[:, :, None] * colours[:, None, :]  # (K, V, 3)


def make_albedo(vertices, landmarks, *, num_modes: int = THETA_SIZES["albedo"]):
    """The albedo model of any face mesh, built from its vertices and 68 landmarks.

    Mean: skin tone with darker brows (around the brow landmarks 17-26), red lips (inside the
    outer lip polygon 48-59, in the x-y plane), a dark mouth line (inner lip 60-67), eyes
    (sclera, iris, pupil inside 36-41 and 42-47), nostril spots and a cheek blush. Basis:
    `num_modes` smooth Gaussian-process colour modes with correlated channels; the top modes
    change a vertex's colour by about 0.05 per std.

    Args:
        vertices: (V, 3) mean shape, mm, model-space convention (tensor or array).
        landmarks: (68,) vertex ids.
    Returns:
        mean_albedo (V, 3) float32 in [0, 1], albedo_basis (num_modes, V, 3) float32.
    """
    V = check_array(vertices, (None, 3), "vertices")[0]
    check_ids(landmarks, (68,), V, "landmarks")
    p = torch.as_tensor(to_numpy(vertices).astype(np.float64))  # (V, 3)
    lm = p[to_long(landmarks)]  # (68, 3)
    mean = _painted_albedo(p, lm).clamp(0, 1)  # (V, 3)
    return mean.float(), _albedo_basis(p, num_modes)


# ----------------------------------------------------------------------------- toy model

TOY_CHIN_Y, TOY_TOP_Y = -110.0, 88.0  # mm, bottom and top rows of the grid
TOY_HALF_WIDTH = 74.0  # mm, half-width of the face outline at eye height
TOY_JAW_HEIGHT = 116.0  # mm, vertical semi-axis of the elliptic jaw outline below y = 0
TOY_MOUTH_Y = -62.0  # mm, the mouth line
ID_KERNEL = (76.0, (1.0, 0.35, 0.12))  # length scale mm, variances at 76, 38, 19 mm
ID_AXIS_STD = (3.3, 3.3, 4.3)  # mm, std scale of the x, y, z displacement fields
ID_ANTISYMMETRIC = 0.2  # variance of asymmetric identity variation relative to symmetric

# 68 landmark targets (x, y) in mm on the toy surface: the subject's right side (x < 0) and
# the midline; the left side is mirrored. Jaw: an ellipse from ear height (0) to the chin (8).
_JAW = [(-70.0 * math.cos(a), -108.0 * math.sin(a)) for a in (k * math.pi / 16 for k in range(8))]
_RIGHT = dict(zip(
    list(range(8)) + [17, 18, 19, 20, 21, 31, 32, 36, 37, 38, 39, 40, 41, 48, 49, 50, 59, 58, 60, 61, 67],
    _JAW + [(-60.0, 16.0), (-50.0, 23.0), (-39.0, 25.5), (-28.0, 25.0), (-17.0, 22.0),  # brow
            (-14.0, -38.0), (-7.0, -41.0),  # nostril
            (-45.0, 0.0), (-37.0, 5.0), (-26.0, 5.5), (-18.0, 0.0), (-26.0, -4.5), (-37.0, -4.5),
            (-25.0, -62.0), (-16.0, -56.0), (-6.0, -53.5), (-16.0, -68.0), (-7.0, -71.0),  # lip
            (-22.0, -62.0), (-8.0, -61.0), (-8.0, -63.0)]))  # inner lip
_MIDLINE = {8: -108.0, 27: 2.0, 28: -9.0, 29: -20.0, 30: -31.0, 33: -43.0, 51: -54.5, 57: -72.0,
            62: -61.0, 66: -63.0}


def _toy_landmark_targets():
    """(68, 2) target (x, y) per landmark, mirror symmetric, and (68,) side of the mouth line
    (+1: upper inner lip, -1: lower inner lip, 0: anywhere)."""
    targets = torch.zeros(68, 2, dtype=torch.float64)
    for k, (x, y) in _RIGHT.items():
        targets[k] = torch.tensor((x, y))
        targets[LANDMARK_MIRROR[k]] = torch.tensor((-x, y))
    for k, y in _MIDLINE.items():
        targets[k] = torch.tensor((0.0, y))
    side = torch.zeros(68)
    side[[61, 62, 63]] = 1.0
    side[[65, 66, 67]] = -1.0
    return targets, side


def _toy_half_width(y: torch.Tensor) -> torch.Tensor:
    """Half-width (mm) of the face outline at height y: an ellipse for the jaw below y = 0, a
    gently narrowing forehead above."""
    jaw = TOY_HALF_WIDTH * (1 - (y / TOY_JAW_HEIGHT) ** 2).clamp(min=0).sqrt()
    forehead = TOY_HALF_WIDTH - 14.0 * (y / TOY_TOP_Y) ** 2
    return torch.where(y < 0, jaw, forehead)


def _toy_depth(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Height field z(x, y) of the toy mean face, mm, from smooth bumps; u = x / half-width.

    Bilateral features are mirrored pairs of bumps, so the surface is exactly mirror symmetric.
    """
    g, pair = _gauss, _pair
    # base: each row an elliptic arc from z = 0 at the outline to c(y) at the midline;
    # c(y) bulges at the cheeks and recedes towards the chin and the upper forehead
    s0 = math.sqrt(1 - 1 / 1.06 ** 2)
    arc = ((1 - (u / 1.06) ** 2).sqrt() - s0) / (1 - s0)
    z = (74.0 - 0.0011 * (y + 10.0) ** 2 - 0.0035 * (y - 15.0).clamp(min=0) ** 2) * arc
    # brow ridge, glabella, the dip at the nasion
    z = z + 3.0 * pair(x, y, 30, 20, 20, 7) + 1.5 * g(x, y, 0, 16, 10, 8) - 2.0 * g(x, y, 0, 5, 8, 5)
    # eye sockets, eyeballs under the lids
    z = z - 14.0 * pair(x, y, 31.5, 0, 14, 10) + 7.0 * pair(x, y, 31.5, 0, 9, 6)
    # nose ridge: rises from the nasion (y = 6) towards the tip (y ~ -32), widening, then drops
    t = ((6.0 - y) / 36.0).clamp(min=0)
    ridge_h = (2.0 + 12.0 * t ** 1.6) * torch.sigmoid((y + 36.0) / 2.5) * torch.sigmoid((9.0 - y) / 2.0)
    z = z + ridge_h * torch.exp(-0.5 * (x / (4.0 + 4.0 * t.clamp(max=1.2))) ** 2)
    # nose tip, nostril wings (alae), nostril openings
    z = z + 7.5 * g(x, y, 0, -32, 8, 6) + 8.0 * pair(x, y, 14, -37, 6, 5.5) - 3.0 * pair(x, y, 7, -42, 3, 2)
    # cheekbones, cheeks
    z = z + 5.0 * pair(x, y, 46, -16, 14, 11) + 3.0 * pair(x, y, 38, -48, 16, 14)
    # mouth: dental arch, upper and lower lip, the mouth line and its corners
    z = z + 6.0 * g(x, y, 0, TOY_MOUTH_Y, 26, 16)
    z = z + 5.5 * g(x, y, 0, TOY_MOUTH_Y + 5.0, 17, 4) + 6.0 * g(x, y, 0, TOY_MOUTH_Y - 5.5, 15, 4.5)
    z = z - 4.0 * g(x, y, 0, TOY_MOUTH_Y, 14, 1.6) - 2.0 * pair(x, y, 25, TOY_MOUTH_Y, 2.5, 2.5)
    # mentolabial sulcus, chin, the underside of the chin
    z = z - 2.0 * g(x, y, 0, -81, 16, 5) + 7.0 * g(x, y, 0, -96, 15, 9) - 9.0 * g(x, y, 0, -120, 30, 8)
    return z


def _toy_grid(resolution: int) -> torch.Tensor:
    """Parametric grid of the toy surface: rows from the chin up, columns from x < 0 to x > 0.

    Returns:
        (rows, cols, 3) float64 positions; cols is odd, so x = 0 is a column.
    """
    rows, cols = resolution, resolution + 1 - resolution % 2
    # u in [-1, 1], exactly antisymmetric: (2j - (cols - 1)) / (cols - 1)
    u = (2 * torch.arange(cols, dtype=torch.float64) - (cols - 1)) / (cols - 1)  # (cols,)
    y = TOY_CHIN_Y + (TOY_TOP_Y - TOY_CHIN_Y) * torch.arange(rows, dtype=torch.float64) / (rows - 1)
    u, y = torch.meshgrid(u, y, indexing="xy")  # (rows, cols)
    x = u * _toy_half_width(y)  # (rows, cols)
    return torch.stack([x, y, _toy_depth(x, y, u)], dim=-1)  # (rows, cols, 3)


def _toy_triangles(rows: int, cols: int) -> torch.Tensor:
    """Two counter-clockwise (seen from +z) triangles per grid cell. Left of the midline the
    diagonal runs bottom-left to top-right, right of it the mirror image, so the triangulation
    is mirror symmetric. Returns (2 (rows - 1)(cols - 1), 3) long."""
    i, j = torch.meshgrid(torch.arange(rows - 1), torch.arange(cols - 1), indexing="ij")
    a = (i * cols + j).flatten()  # bottom-left corner of each cell
    b, c, d = a + 1, a + cols + 1, a + cols  # bottom-right, top-right, top-left
    left = (j < (cols - 1) // 2).flatten()[:, None]  # (cells, 1)
    first = torch.where(left, torch.stack([a, b, c], 1), torch.stack([a, b, d], 1))
    second = torch.where(left, torch.stack([a, c, d], 1), torch.stack([b, c, d], 1))
    return torch.stack([first, second], dim=1).view(-1, 3)  # (F, 3)


def _toy_landmarks(points: torch.Tensor) -> torch.Tensor:
    """Nearest vertex (in x, y) to each landmark target; inner-lip points are taken on their
    side of the mouth line, so the upper and lower lip never share a vertex. Returns (68,)."""
    targets, side = _toy_landmark_targets()
    d = torch.cdist(targets, points[:, :2])  # (68, V)
    above = points[:, 1] >= TOY_MOUTH_Y  # (V,)
    wrong_side = ((side[:, None] > 0) & ~above) | ((side[:, None] < 0) & above)  # (68, V)
    return d.masked_fill(wrong_side, float("inf")).argmin(dim=1)


def _toy_identity_basis(points, inducing, mirror, num_modes):
    """Identity modes: a mirror-equivariant vector Gaussian process, Nystroem approximation.

    Component c of the displacement field d(p) has covariance
        K_c(p, q) = s_c^2 [w_s (k(p, q) + e_c k(p, Mq)) / 2 + w_a (k(p, q) - e_c k(p, Mq)) / 2]
    with k the multi-scale squared exponential `ID_KERNEL`, M the mirror x -> -x, e = (-1, 1, 1)
    (x flips sign under the mirror), s = `ID_AXIS_STD`, w_s = 1 and w_a = `ID_ANTISYMMETRIC`:
    mostly symmetric faces with a little asymmetry. The inducing points P are mirror symmetric
    (`mirror` indexes their mirror images), so k(p, M P) is a column permutation of k(p, P).
    Eigen-pairs (lambda, u) of K_c(P, P) give modes K_c(v, P) u / sqrt(lambda); the modes of
    the three components are ranked together by eigenvalue.

    Args:
        points: (V, 3) float64 vertices; inducing: (M, 3); mirror: (M,) long; num_modes: K.
    Returns:
        (K, V, 3) float32 basis, one std per mode, mm.
    """
    w_s, w_a = 1.0, ID_ANTISYMMETRIC
    signs = (-1.0, 1.0, 1.0)
    # K_c(., P) from k(., P): s_c^2 [(w_s + w_a) / 2 k(., P) + e_c (w_s - w_a) / 2 k(., M P)]
    mix = lambda k, c: ID_AXIS_STD[c] ** 2 * (
        0.5 * (w_s + w_a) * k + 0.5 * signs[c] * (w_s - w_a) * k[:, mirror])
    k_pp = _se_kernel(inducing, inducing, *ID_KERNEL)  # (M, M)
    eigen = [_eig_desc(mix(k_pp, c)) for c in range(3)]
    M = inducing.shape[0]
    order = torch.sort(torch.cat([lam for lam, _ in eigen]), descending=True, stable=True).indices[:num_modes]
    k_vp = _se_kernel(points.float(), inducing.float(), *ID_KERNEL)  # (V, M)
    basis = torch.zeros(num_modes, points.shape[0], 3)
    for c in range(3):
        mine = order // M == c  # (K,) modes of component c
        lam, u = eigen[c]
        idx = order[mine] % M
        coef = u[:, idx] / lam[idx].clamp(min=1e-12).sqrt()  # (M, K_c)
        # K_c(V, P) coef = s_c^2 [a k(V, P) coef + b k(V, M P) coef], k(V, M P) A = k(V, P) A[mirror]
        coef = mix(coef.T, c).T  # (M, K_c)
        basis[mine, :, c] = (k_vp @ coef.float()).T  # (K_c, V)
    return basis


def _vec(weight, dx, dy, dz):
    """Displacement field (V, 3) = weight * (dx, dy, dz); components may be per-vertex."""
    return torch.stack(torch.broadcast_tensors(weight * dx, weight * dy, weight * dz), dim=-1)


def _halton(index: int, base: int) -> float:
    """Radical inverse of `index` in `base` (the Halton low-discrepancy sequence)."""
    result, f = 0.0, 1.0
    while index > 0:
        f /= base
        result += f * (index % base)
        index //= base
    return result


def _toy_expression_basis(points: torch.Tensor, num_modes: int):
    """Expression modes: hand-made localized deformations, one std each, mm.

    Named modes first (jaw, lips, smiles, brows, eyes, cheeks, frown, nose, sideways jaw and
    mouth), then smooth local bumps (Gaussian, sigma 13 mm, 1.5 mm at the centre) centred on a
    Halton sequence over the face, their direction cycling through z, y, x. "left" is the
    subject's left (x > 0).

    Args:
        points: (V, 3) float64 toy mean shape. num_modes: K.
    Returns:
        (K, V, 3) float32 basis, list of K names.
    """
    x, y = points[:, 0], points[:, 1]
    g = _gauss
    # the jaw: everything below a line through the mouth that curves up towards the ears
    side = (x.abs() - 20).clamp(min=0)  # (V,)
    jaw = torch.sigmoid((TOY_MOUTH_Y + side ** 2 / 62.5 - y) / (2.0 + 0.15 * side))  # (V,)
    mouth = g(x, y, 0, TOY_MOUTH_Y, 20, 9)  # (V,)
    modes = {
        "jaw_open": _vec(jaw, 0.0, -10.0, -5.0),
        "lips_pucker": _vec(mouth, -0.2 * x, 0.0, 4.0),
        "lips_stretch": _vec(mouth, 0.2 * x, 0.0, -1.5),
        "upper_lip_up": _vec(g(x, y, 0, TOY_MOUTH_Y + 6, 18, 5), 0.0, 3.0, 1.0),
        "lower_lip_down": _vec(g(x, y, 0, TOY_MOUTH_Y - 6, 16, 5), 0.0, -3.0, 1.0),
        "smile_left": _vec(g(x, y, 25, TOY_MOUTH_Y + 2, 10, 9), 3.5, 4.0, -1.5)
        + _vec(g(x, y, 36, -30, 15, 12), 0.0, 2.0, 2.0),
        "smile_right": _vec(g(x, y, -25, TOY_MOUTH_Y + 2, 10, 9), -3.5, 4.0, -1.5)
        + _vec(g(x, y, -36, -30, 15, 12), 0.0, 2.0, 2.0),
        "brow_up_left": _vec(g(x, y, 30, 24, 18, 9), 0.0, 4.0, 0.0),
        "brow_up_right": _vec(g(x, y, -30, 24, 18, 9), 0.0, 4.0, 0.0),
        "brow_down_left": _vec(g(x, y, 22, 22, 14, 7), -1.5, -3.0, 1.0),
        "brow_down_right": _vec(g(x, y, -22, 22, 14, 7), 1.5, -3.0, 1.0),
        "eye_close_left": _vec(g(x, y, 31.5, 5, 9, 4), 0.0, -3.5, 0.5),
        "eye_close_right": _vec(g(x, y, -31.5, 5, 9, 4), 0.0, -3.5, 0.5),
        "cheek_puff_left": _vec(g(x, y, 42, -48, 17, 15), 3.0, 0.0, 4.0),
        "cheek_puff_right": _vec(g(x, y, -42, -48, 17, 15), -3.0, 0.0, 4.0),
        "frown": _vec(_pair(x, y, 25, TOY_MOUTH_Y - 3, 9, 8), 0.0, -3.0, 0.0),
        "nose_wrinkle": _vec(g(x, y, 0, -10, 14, 9), 0.0, 2.0, 1.0),
        "jaw_sideways": _vec(jaw, 3.0, 0.0, 0.0),
        "mouth_sideways": _vec(mouth, 3.0, 0.0, 0.0),
        "lips_press": _vec(mouth, 0.0, 0.0, -2.0),
    }
    names, fields = list(modes), list(modes.values())
    directions = ((0.0, 0.0, 1.5), (0.0, 1.5, 0.0), (1.5, 0.0, 0.0))
    for n in range(num_modes - len(names)):
        # a Halton point of the unit square -> (u, row height) on the face, away from its border
        u, v = 1.7 * _halton(n + 1, 2) - 0.85, 0.05 + 0.9 * _halton(n + 1, 3)
        cy = TOY_CHIN_Y + (TOY_TOP_Y - TOY_CHIN_Y) * v
        cx = u * float(_toy_half_width(torch.tensor(cy)))
        fields.append(_vec(g(x, y, cx, cy, 13.0, 13.0), *directions[n % 3]))
        names.append(f"local_{n:02d}")
    return torch.stack(fields[:num_modes]).float(), names[:num_modes]


def toy_face_model(resolution: int = 64) -> MorphableModel:
    """The embedded toy morphable model, built deterministically in code (see module docs).

    Args:
        resolution: grid side n >= 16 (n rows; n columns, n + 1 if n is even). 64: 4,160
            vertices / 8,064 triangles; 133: 17,689 / 34,848; 188: 35,532 / 70,312.
    Returns:
        MorphableModel named "toy:<resolution>", with `exp_names`.
    """
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 16:
        raise ValueError(f"toy resolution must be an integer >= 16, got {resolution!r}")
    grid = _toy_grid(resolution)  # (rows, cols, 3)
    rows, cols, _ = grid.shape
    points = grid.reshape(-1, 3)  # (V, 3)
    landmarks = _toy_landmarks(points)  # (68,)
    # identity GP inducing points: a coarse grid of the same surface (mirror symmetric)
    coarse = _toy_grid(17).reshape(-1, 3)  # (M, 3)
    mirror = torch.arange(coarse.shape[0]).view(17, 17).flip(1).flatten()  # (M,)
    id_basis = _toy_identity_basis(points, coarse, mirror, THETA_SIZES["id"])
    exp_basis, exp_names = _toy_expression_basis(points, THETA_SIZES["exp"])
    points = center_behind_nose(points, landmarks)  # the displacement bases do not depend on it
    mean_albedo, albedo_basis = make_albedo(points, landmarks)  # as for loaded models
    return MorphableModel(points, id_basis, exp_basis, mean_albedo, albedo_basis,
                          _toy_triangles(rows, cols), landmarks, name=f"toy:{resolution}",
                          exp_names=exp_names, license="built in code by this project")
