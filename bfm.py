"""The 3D morphable face model: parameter layout, embedded toy model, loaders for real models.

Paper: Sec. 3.1 (the face autoencoder decodes theta = [alpha, gamma, phi, c] in R^257 with a
3DMM: shape alpha in R^144 = 80 identity + 64 expression coefficients, albedo gamma in R^80,
illumination phi in R^27, camera c in R^6), Sec. 3.2 (landmark weights of Eq. 7) and Sec. 4.1
(the paper uses the Basel Face Model 2017). A linear 3DMM is

    S(alpha) = S_mean + sum_k alpha_id_k B_id_k + sum_k alpha_exp_k B_exp_k     (shape, mm)
    A(gamma) = A_mean + sum_k gamma_k B_alb_k                                    (albedo, [0, 1])

with every coefficient in standard-deviation units (prior N(0, 1)): each basis vector already
includes its standard deviation (BFM: pcaBasis * sqrt(pcaVariance)), so the regulariser L_reg
of Eq. 8 is the squared norm of the coefficients.

Conventions (shape letters B batch, V vertices, F triangles, K modes):
- Model space in millimetres: x to the viewer's right when the face is seen from the front
  (the subject's left), y up, z towards the viewer. The origin sits inside the head,
  `NOSE_TIP_DEPTH` = 95 mm straight behind the nose tip, so rotations about it look natural
  and theta = 0 frames the face from the brows to the chin in the renderer's 224 x 224 view.
  The toy face spans x in [-74, 74], y in [-79, 119] (chin to upper forehead), z in [0, 95].
- Triangles (F, 3) long are counter-clockwise seen from the front (+z).
- 68 landmarks in the iBUG / Multi-PIE convention (0-based: jaw 0-16, brows 17-26, nose
  bridge 27-30, nostrils 31-35, eyes 36-47, outer lip 48-59, inner lip 60-67); point 0 is on
  the subject's right (x < 0). `LANDMARK_MIRROR` is the left/right flip of these ids.
- theta (B, 257) = id 80 | exp 64 | albedo 80 | sh 27 | pose 6 (`THETA_SIZES`, `split_theta`).
- Every model holds bases at exactly these sizes: a file with more modes keeps the leading
  ones, a file with fewer gets zero modes (their coefficients have no effect).

Face models (`load_face_model(spec)`; keyword options may follow the spec as ",key=value"):
- "toy" (default; e.g. "toy,resolution=188"): built in code, deterministically, in about a
  second (`toy_face_model`). A height field z(x, y) of smooth bumps (forehead, brow ridge, eye
  sockets and eyeballs, nose bridge, tip and wings, cheekbones, lips and mouth line, chin,
  jaw) over an n x n parametric grid bounded by a face outline (n rows; n columns, or n + 1
  when n is even so that x = 0 is a column), quads split in two. Resolution n gives
  V = n * n (odd n) or n * (n + 1) vertices and F = 2 (n - 1)(columns - 1) triangles:
  n = 64: 4,160 / 8,064; n = 133: 17,689 / 34,848; n = 188: 35,532 / 70,312 (the BFM 2017
  face crop has about 35k vertices and 70k triangles). Exactly mirror symmetric
  (`mirror_permutation`). Identity: 80 smooth mirror-equivariant Gaussian-process modes
  (Nystroem), about 3.3 mm rms per std for the top mode. Expression: 64 localized modes
  (jaw, lips, smiles, brows, eyes, cheeks, ..., then smooth local bumps; `model.exp_names`):
  jaw open 11 mm at the chin per std, 1.5-5 mm for the others. Albedo: `make_albedo`.
  Landmarks: the vertex nearest (in x, y) to fixed target points, so they sit at the same
  place at every resolution.
- "npz:PATH": our own format, a numpy .npz (float arrays may be float16/32/64):
      mean_shape (V, 3) mm                   required
      id_basis (K, V, 3) mm per std          required
      triangles (F, 3) int, 0-based          required
      landmarks68 (68,) int, 0-based         required (or pass landmarks=)
      exp_basis (K', V, 3) mm                optional (else zero modes)
      exp_names (K',) str                    optional
      exp_kind () str                        optional: "pca" (exp_basis is one std per mode)
                                             or "blendshape" (offsets at full activation,
                                             scaled by `blendshape_std`); default
                                             "blendshape" when exp_names is present, else "pca"
      mean_albedo (V, 3) in [0, 1]           optional (else `make_albedo`)
      albedo_basis (K'', V, 3) per std       optional (else `make_albedo`)
      license () str                         optional, kept as `model.license`
  e.g. ICT-FaceKit's narrow face converted to this schema (6,706 vertices, 100 identity
  modes, 53 ARKit-style blendshapes, no albedo).
- "bfm2017:PATH": Basel Face Model 2017 .h5 (needs the optional h5py: `pip install h5py`).
  Groups shape|expression|color/model/{mean, pcaBasis, pcaVariance} and
  shape/representer/cells (3, F); vectors interleave x, y, z per vertex; basis = pcaBasis *
  sqrt(pcaVariance); millimetres; colours in [0, 1].
- "bfm2009:PATH": Basel Face Model 2009 `01_MorphableModel.mat` (scipy): shapeMU/shapePC/
  shapeEV in micrometres (divided by 1000; EV are standard deviations), texMU/texPC/texEV on
  0..255 (divided by 255), tl 1-based. It has no expression model: the 64 expression modes
  are zero.
- "ict:DIR": an ICT-FaceKit checkout (its root or FaceXModel/): generic_neutral_mesh.obj,
  identityNNN.obj and the expression OBJs named in vertex_indices.json, in centimetres
  (multiplied by 10); region "narrow" (vertices 0-6705, the default), "full" (0-9408) or
  "all"; its 68 landmark ids as its README lists them (`ICT_LANDMARKS68`). Identity modes
  are one std each (ICT samples identities from N(0, 1)). Expressions are blendshape offsets
  at full activation, not a PCA: we model an activation as N(0, s^2) with s =
  `blendshape_std` = 0.5, i.e. the basis is 0.5 x the offset (ICT jawOpen: chin about 20 mm
  down and back per std). Negative coefficients extrapolate the blendshapes backwards, as in
  any linear model.
Loaders of real models take `landmarks=`: a file with 68 whitespace- or comma-separated
0-based vertex ids in iBUG order (or a .npy, or a sequence). BFM files carry no 68-point
landmark ids (the official code's ids refer to its private face crop), so for them it is
required. To make one: write the mean face with `save_obj`, open it in a mesh viewer that
shows vertex indices (e.g. MeshLab's "Get Info" picking), pick the 68 points in iBUG order and
write them one per line. Loaders make the triangles counter-clockwise seen from the front
(all are flipped when the area-weighted normal points to -z) and, with `recenter=True`
(default), translate the mean so that the origin is `NOSE_TIP_DEPTH` straight behind the
nose tip (landmark 30).
Models without albedo get `make_albedo` on their own mesh.

Deviations from the paper:
- The paper uses BFM 2017, which cannot be shipped. The default is a toy model built in code
  with the same interface (identity modes are a Gaussian process, not learned from scans;
  expressions are hand-made localized deformations); real models load from user files.
- Models without an albedo model (toy, ICT, npz without albedo) get `make_albedo`: a painted
  mean (skin, darker brows, red lips, eyes, nostrils) plus 80 Gaussian-process colour modes.

Run `python bfm.py` to build the toy model and print its summary (`--obj PATH` writes the mean
face with its albedo); `python -m pytest -q tests/test_bfm.py` tests this module.
"""
import argparse
import json
import math
import os
import re
import time
import zipfile
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

THETA_SIZES = {"id": 80, "exp": 64, "albedo": 80, "sh": 27, "pose": 6}  # 257, Sec. 3.1
NOSE_TIP_DEPTH = 95.0  # mm from the model-space origin to the nose tip along +z
BLENDSHAPE_STD = 0.5  # std of a blendshape activation, N(0, s^2), for non-PCA expressions

# Eq. 7 landmark weights: 20 on the nose ridge (0-based 28-30) and the inner lip (60-67), Sec. 3.2
LANDMARK_WEIGHTS = tuple(20.0 if k in (28, 29, 30) or 60 <= k <= 67 else 1.0 for k in range(68))

_MIRROR_PAIRS = ([(k, 16 - k) for k in range(8)] + [(17 + k, 26 - k) for k in range(5)]
                 + [(31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42), (40, 47),
                    (41, 46), (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64),
                    (61, 63), (65, 67)])


def _mirror_table(pairs):
    table = list(range(68))
    for a, b in pairs:
        table[a], table[b] = b, a
    return tuple(table)


# landmark k of a mirrored face is landmark LANDMARK_MIRROR[k] of the original
LANDMARK_MIRROR = _mirror_table(_MIRROR_PAIRS)

# ICT-FaceKit README, "Multi-PIE 68 point facial landmarks indices" (0-based)
ICT_LANDMARKS68 = (
    1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272,
    4088, 3443, 268, 493, 1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942,
    4857, 1140, 2075, 1147, 4269, 3360, 1507, 1542, 1537, 1528, 1518, 1511, 3742, 3751, 3756,
    3721, 3725, 3732, 5708, 5695, 2081, 0, 4275, 6200, 6213, 6346, 6461, 5518, 5957, 5841,
    5702, 5711, 5533, 6216, 6207, 6470, 5517, 5966)
# ICT-FaceKit README, "Face Area Details": (vertices, polygons) at the start of its mesh
ICT_REGIONS = {"narrow": (6706, 6560), "full": (9409, 9230)}


# ----------------------------------------------------------------------------- theta layout

class Theta(NamedTuple):
    """theta split into its named parts (Sec. 3.1); each a (B, n) view of theta."""
    id: torch.Tensor  # (B, 80) alpha_id
    exp: torch.Tensor  # (B, 64) alpha_exp
    albedo: torch.Tensor  # (B, 80) gamma
    sh: torch.Tensor  # (B, 27) phi, 9 SH coefficients per RGB channel
    pose: torch.Tensor  # (B, 6) c: 3 Euler angles (rad), 3 translations (mm)


def split_theta(theta: torch.Tensor) -> Theta:
    """(B, 257) -> Theta of views (B, 80), (B, 64), (B, 80), (B, 27), (B, 6)."""
    total = sum(THETA_SIZES.values())
    if not torch.is_tensor(theta) or theta.dim() != 2 or theta.shape[1] != total:
        shape = tuple(theta.shape) if torch.is_tensor(theta) else type(theta).__name__
        raise ValueError(f"theta must be a (B, {total}) tensor, got {shape}")
    return Theta(*torch.split(theta, list(THETA_SIZES.values()), dim=1))


def join_theta(parts: Theta) -> torch.Tensor:
    """Theta of (B, n) parts -> (B, 257); the inverse of `split_theta`."""
    if len(parts) != len(THETA_SIZES):
        raise ValueError(f"expected {len(THETA_SIZES)} parts {list(THETA_SIZES)}, got {len(parts)}")
    B = parts[0].shape[0] if parts[0].dim() == 2 else -1
    for (name, size), part in zip(THETA_SIZES.items(), parts):
        if part.dim() != 2 or tuple(part.shape) != (B, size):
            raise ValueError(f"theta part {name!r} must be ({B}, {size}), got {tuple(part.shape)}")
    return torch.cat(tuple(parts), dim=1)  # (B, 257)


# ----------------------------------------------------------------------------- the model

class MorphableModel(torch.nn.Module):
    """A linear 3DMM with bases at the theta-layout sizes (80 identity, 64 expression, 80 albedo).

    All tensors are registered buffers, so `.to(device)` and `.double()` move them; float32 by
    default. Buffers: mean_shape (V, 3) mm, id_basis (80, V, 3), exp_basis (64, V, 3),
    mean_albedo (V, 3) in [0, 1], albedo_basis (80, V, 3), triangles (F, 3) long
    (counter-clockwise seen from the front), landmarks (68,) long vertex ids, landmark_weights
    (68,). Attributes: `name` (e.g. "toy:64", "npz:PATH"), `exp_names` (tuple of str, may be
    empty), `license` (str).
    """

    def __init__(self, mean_shape, id_basis, exp_basis, mean_albedo, albedo_basis, triangles,
                 landmarks, *, name: str, exp_names: Sequence[str] = (), license: str = ""):
        super().__init__()
        V = _check_array(mean_shape, (None, 3), "mean_shape")[0]
        _check_array(id_basis, (THETA_SIZES["id"], V, 3), "id_basis")
        _check_array(exp_basis, (THETA_SIZES["exp"], V, 3), "exp_basis")
        _check_array(albedo_basis, (THETA_SIZES["albedo"], V, 3), "albedo_basis")
        _check_array(mean_albedo, (V, 3), "mean_albedo")
        _check_ids(triangles, (None, 3), V, "triangles")
        _check_ids(landmarks, (68,), V, "landmarks")
        self.register_buffer("mean_shape", _float(mean_shape))
        self.register_buffer("id_basis", _float(id_basis))
        self.register_buffer("exp_basis", _float(exp_basis))
        self.register_buffer("mean_albedo", _float(mean_albedo))
        self.register_buffer("albedo_basis", _float(albedo_basis))
        self.register_buffer("triangles", _long(triangles))
        self.register_buffer("landmarks", _long(landmarks))
        self.register_buffer("landmark_weights", torch.tensor(LANDMARK_WEIGHTS))
        self.name = name
        self.exp_names = tuple(str(n) for n in exp_names)
        self.license = license

    @property
    def num_vertices(self) -> int:
        return self.mean_shape.shape[0]

    @property
    def num_faces(self) -> int:
        return self.triangles.shape[0]

    def vertices(self, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
        """Shape S = S_mean + sum_k alpha_id_k B_id_k + sum_k alpha_exp_k B_exp_k (Sec. 3.1).

        Args:
            id_coeff: (B, 80) identity coefficients, std units.
            exp_coeff: (B, 64) expression coefficients, std units.
        Returns:
            (B, V, 3) vertices in model space, mm.
        """
        B = _check_coeff(id_coeff, THETA_SIZES["id"], "id_coeff")
        _check_coeff(exp_coeff, THETA_SIZES["exp"], "exp_coeff", batch=B)
        V = self.num_vertices
        # sum_k alpha_k B_k: one matrix product per basis, on the flattened (K, 3V) bases
        offsets = id_coeff @ self.id_basis.view(-1, 3 * V)  # (B, 3V)
        offsets = offsets + exp_coeff @ self.exp_basis.view(-1, 3 * V)  # (B, 3V)
        return self.mean_shape + offsets.view(B, V, 3)  # (B, V, 3)

    def albedo(self, albedo_coeff: torch.Tensor) -> torch.Tensor:
        """Albedo A = A_mean + sum_k gamma_k B_alb_k (Sec. 3.1), not clamped to [0, 1].

        Args:
            albedo_coeff: (B, 80) albedo coefficients gamma, std units.
        Returns:
            (B, V, 3) per-vertex RGB albedo.
        """
        B = _check_coeff(albedo_coeff, THETA_SIZES["albedo"], "albedo_coeff")
        V = self.num_vertices
        offsets = albedo_coeff @ self.albedo_basis.view(-1, 3 * V)  # (B, 3V)
        return self.mean_albedo + offsets.view(B, V, 3)  # (B, V, 3)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, vertices={self.num_vertices}, faces={self.num_faces}"


def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if torch.is_tensor(array) else np.asarray(array)


def _float(array) -> torch.Tensor:
    return torch.as_tensor(_numpy(array).astype(np.float32)).contiguous()


def _long(array) -> torch.Tensor:
    return torch.as_tensor(_numpy(array).astype(np.int64)).contiguous()


def _check_array(array, shape, name, source=""):
    """Check an array's shape (None matches any size) and that it is finite; returns the shape."""
    actual = tuple(array.shape) if hasattr(array, "shape") else None
    ok = actual is not None and len(actual) == len(shape) and all(
        s is None or s == a for s, a in zip(shape, actual))
    if not ok:
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{source}{name} must have shape {want}, got {actual}")
    values = _numpy(array)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{source}{name} must be numeric, got dtype {values.dtype}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"{source}{name} contains NaN or infinite values")
    return actual


def _check_ids(ids, shape, num_vertices, name, source=""):
    """Check an integer array of vertex ids: shape and range [0, num_vertices)."""
    _check_array(ids, shape, name, source)
    values = _numpy(ids)
    if values.dtype.kind not in "iu":
        raise ValueError(f"{source}{name} must hold integer vertex ids, got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= num_vertices):
        raise ValueError(f"{source}{name} holds vertex ids outside [0, {num_vertices}): "
                         f"min {values.min()}, max {values.max()}")


def _check_coeff(coeff, size, name, batch=None) -> int:
    if not torch.is_tensor(coeff) or coeff.dim() != 2 or coeff.shape[1] != size or (
            batch is not None and coeff.shape[0] != batch):
        shape = tuple(coeff.shape) if torch.is_tensor(coeff) else type(coeff).__name__
        want = f"({'B' if batch is None else batch}, {size})"
        raise ValueError(f"{name} must be a {want} tensor, got {shape}")
    return coeff.shape[0]


# ----------------------------------------------------------------------------- shared parts

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


def fit_modes(basis, num_modes: int, num_vertices: int) -> torch.Tensor:
    """Keep the leading `num_modes` modes of a (K, V, 3) basis, or pad it with zero modes;
    None gives all-zero modes. Returns (num_modes, V, 3) float32."""
    if basis is None:
        return torch.zeros(num_modes, num_vertices, 3)
    basis = _float(_numpy(basis)[:num_modes])
    pad = torch.zeros(num_modes - basis.shape[0], num_vertices, 3)
    return torch.cat([basis, pad], dim=0)  # (num_modes, V, 3)


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
    V = _check_array(vertices, (None, 3), "vertices")[0]
    _check_ids(landmarks, (68,), V, "landmarks")
    p = torch.as_tensor(_numpy(vertices).astype(np.float64))  # (V, 3)
    lm = p[_long(landmarks)]  # (68, 3)
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
    points = _recenter(points, landmarks)  # the displacement bases do not depend on it
    mean_albedo, albedo_basis = make_albedo(points, landmarks)  # as for loaded models
    return MorphableModel(points, id_basis, exp_basis, mean_albedo, albedo_basis,
                          _toy_triangles(rows, cols), landmarks, name=f"toy:{resolution}",
                          exp_names=exp_names, license="built in code by this project")


# ----------------------------------------------------------------------------- loaders

def read_landmark_ids(landmarks) -> np.ndarray:
    """68 landmark vertex ids from a file (whitespace/comma separated integers, "#" comments,
    or a .npy) or from a sequence/array/tensor. Returns (68,) int64."""
    source = ""
    if isinstance(landmarks, (str, os.PathLike)):
        path = os.fspath(landmarks)
        _require_file(path, "landmark id")
        if path.endswith(".npy"):
            ids = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                tokens = re.sub(r"#.*", "", f.read()).replace(",", " ").split()
            if not all(re.fullmatch(r"[+-]?\d+", t) for t in tokens):
                raise ValueError(f"{path}: a landmark id file must hold integers only")
            ids = np.array([int(t) for t in tokens], dtype=np.int64)
        source = f"{path}: "
    else:
        ids = _numpy(landmarks)
    if ids.shape != (68,) or ids.dtype.kind not in "iu":
        raise ValueError(f"{source}expected 68 integer landmark vertex ids, got shape "
                         f"{ids.shape}, dtype {ids.dtype}")
    return ids.astype(np.int64)


def _orient_front(mean_shape: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Flip every triangle when the area-weighted normal of the mesh points to -z."""
    a, b, c = (mean_shape[triangles[:, k]] for k in range(3))
    normal_z = np.cross(b - a, c - a)[:, 2].sum()
    return triangles[:, ::-1].copy() if normal_z < 0 else triangles


def _recenter(mean_shape, landmarks):
    """Translate (V, 3) points (numpy or torch) so the origin is NOSE_TIP_DEPTH straight
    behind the nose tip (landmark 30).

    With the renderer's camera (1014.72 px at 224 x 224, 1 m away) theta = 0 then frames the
    face from the brows to the chin, as an aligned 224 x 224 crop does."""
    origin = mean_shape[landmarks[30]] * 1.0  # a copy
    origin[2] = origin[2] - NOSE_TIP_DEPTH
    return mean_shape - origin


def model_from_arrays(source: str, *, mean_shape, id_basis, triangles, landmarks,
                      exp_basis=None, exp_names=(), mean_albedo=None, albedo_basis=None,
                      recenter: bool = True, license: str = "") -> MorphableModel:
    """Validate loaded arrays and assemble a MorphableModel (every loader ends here).

    Checks shapes, finiteness and id ranges (errors start with `source`), orients the
    triangles counter-clockwise seen from the front, optionally recenters (module docs), keeps
    the leading modes or pads with zero modes, and builds what is missing of the albedo with
    `make_albedo`.
    """
    src = f"{source}: "
    V = _check_array(mean_shape, (None, 3), "mean_shape", src)[0]
    _check_array(id_basis, (None, V, 3), "id_basis", src)
    for name, basis in (("exp_basis", exp_basis), ("albedo_basis", albedo_basis)):
        if basis is not None:
            _check_array(basis, (None, V, 3), name, src)
    if mean_albedo is not None:
        _check_array(mean_albedo, (V, 3), "mean_albedo", src)
    _check_ids(triangles, (None, 3), V, "triangles", src)
    _check_ids(landmarks, (68,), V, "landmarks", src)
    mean_shape = _numpy(mean_shape).astype(np.float64)
    landmarks = _numpy(landmarks).astype(np.int64)
    triangles = _orient_front(mean_shape, _numpy(triangles).astype(np.int64))
    if recenter:
        mean_shape = _recenter(mean_shape, landmarks)
    if mean_albedo is None or albedo_basis is None:
        made_mean, made_basis = make_albedo(mean_shape, landmarks)
        mean_albedo = made_mean if mean_albedo is None else mean_albedo
        albedo_basis = made_basis if albedo_basis is None else albedo_basis
    return MorphableModel(
        mean_shape, fit_modes(id_basis, THETA_SIZES["id"], V),
        fit_modes(exp_basis, THETA_SIZES["exp"], V), mean_albedo,
        fit_modes(albedo_basis, THETA_SIZES["albedo"], V), triangles, landmarks,
        name=source, exp_names=tuple(exp_names)[:THETA_SIZES["exp"]], license=license)


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what} file (check the path)")
    return path


def load_npz(path: str, *, landmarks=None, recenter: bool = True,
             blendshape_std: float = BLENDSHAPE_STD) -> MorphableModel:
    """Load our .npz schema (module docs). `landmarks` overrides the file's landmarks68."""
    _require_file(path, ".npz face model")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    required = ["mean_shape", "id_basis", "triangles"] + ([] if landmarks is not None else ["landmarks68"])
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{path}: missing required key(s) {missing} (required: mean_shape, "
                         f"id_basis, triangles, landmarks68)")
    exp_names = [str(n) for n in data.get("exp_names", [])]
    exp_kind = str(data.get("exp_kind", "blendshape" if exp_names else "pca"))
    if exp_kind not in ("pca", "blendshape"):
        raise ValueError(f"{path}: exp_kind must be 'pca' or 'blendshape', got {exp_kind!r}")
    exp_basis = data.get("exp_basis")
    if exp_basis is not None and exp_kind == "blendshape":
        # an activation ~ N(0, s^2): one std of the coefficient is s x the full offset
        exp_basis = exp_basis.astype(np.float32) * blendshape_std
    lm = read_landmark_ids(landmarks) if landmarks is not None else data["landmarks68"]
    return model_from_arrays(
        f"npz:{path}", mean_shape=data["mean_shape"], id_basis=data["id_basis"],
        triangles=data["triangles"], landmarks=lm, exp_basis=exp_basis, exp_names=exp_names,
        mean_albedo=data.get("mean_albedo"), albedo_basis=data.get("albedo_basis"),
        recenter=recenter, license=str(data.get("license", "")))


def _bfm_landmarks(path: str, landmarks) -> np.ndarray:
    if landmarks is None:
        raise ValueError(
            f"{path}: Basel Face Model files carry no 68-point landmark vertex ids; pass "
            f"landmarks=FILE with 68 0-based vertex ids in iBUG order (see bfm.py's docstring "
            f"for how to make one), e.g. spec 'bfm2017:{path},landmarks=bfm_landmarks68.txt'")
    return read_landmark_ids(landmarks)


def _interleaved(vector, V: int) -> np.ndarray:
    """(3V,) or (3V, 1), x1 y1 z1 x2 ... -> (V, 3)."""
    return np.asarray(vector, dtype=np.float64).reshape(V, 3)


def _pca_basis(components, std, V: int, k: int) -> np.ndarray:
    """(3V, K) unit components and (K,) standard deviations -> (min(k, K), V, 3), one std each."""
    components = np.asarray(components, dtype=np.float64)[:, :k]
    std = np.asarray(std, dtype=np.float64).reshape(-1)[:components.shape[1]]
    return (components * std).T.reshape(-1, V, 3)


def load_bfm2017(path: str, *, landmarks=None, recenter: bool = True) -> MorphableModel:
    """Load the Basel Face Model 2017 (.h5; needs h5py). Units mm, colours in [0, 1]."""
    _require_file(path, "BFM 2017 .h5")
    lm = _bfm_landmarks(path, landmarks)
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading BFM 2017 .h5 files needs h5py: pip install h5py") from err

    def read(f, key, columns=None):
        if key not in f:
            raise ValueError(f"{path}: missing dataset {key!r} (is this a BFM 2017 .h5 file?)")
        return np.asarray(f[key][:, :columns] if columns else f[key][()], dtype=np.float64)

    with h5py.File(path, "r") as f:
        mean = read(f, "shape/model/mean")
        V = mean.size // 3
        bases = {}
        for group, k in (("shape", THETA_SIZES["id"]), ("expression", THETA_SIZES["exp"]),
                         ("color", THETA_SIZES["albedo"])):
            if group == "expression" and group not in f:
                bases[group] = None
                continue
            components = read(f, f"{group}/model/pcaBasis", k)  # (3V, k)
            if components.shape[0] != 3 * V:
                raise ValueError(f"{path}: {group}/model/pcaBasis has {components.shape[0]} "
                                 f"rows, expected 3 x {V}")
            # basis = pcaBasis * sqrt(pcaVariance)
            std = np.sqrt(np.clip(read(f, f"{group}/model/pcaVariance"), 0, None))
            bases[group] = _pca_basis(components, std, V, k)
        cells = read(f, "shape/representer/cells")
        color_mean = read(f, "color/model/mean")
    if cells.ndim != 2 or cells.shape[0] != 3 or color_mean.size != 3 * V:
        raise ValueError(f"{path}: shape/representer/cells must be (3, F) and color/model/mean "
                         f"(3 x {V},), got {cells.shape} and {color_mean.shape}")
    return model_from_arrays(
        f"bfm2017:{path}", mean_shape=_interleaved(mean, V), id_basis=bases["shape"],
        triangles=cells.T.astype(np.int64), landmarks=lm, exp_basis=bases["expression"],
        mean_albedo=_interleaved(color_mean, V), albedo_basis=bases["color"],
        recenter=recenter, license="Basel Face Model 2017 (see its license)")


def load_bfm2009(path: str, *, landmarks=None, recenter: bool = True) -> MorphableModel:
    """Load the Basel Face Model 2009 (01_MorphableModel.mat): micrometres -> mm, 0..255 ->
    [0, 1], tl 1-based -> 0-based; no expression model (zero modes)."""
    import scipy.io

    _require_file(path, "BFM 2009 .mat")
    lm = _bfm_landmarks(path, landmarks)
    try:
        mat = scipy.io.loadmat(path)
    except (NotImplementedError, ValueError, OSError) as err:
        raise ValueError(f"{path}: cannot read this .mat file ({err})") from err
    missing = [k for k in ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV", "tl")
               if k not in mat]
    if missing:
        raise ValueError(f"{path}: missing variable(s) {missing} (is this 01_MorphableModel.mat?)")
    V = mat["shapeMU"].size // 3
    for key in ("shapeMU", "shapePC", "texMU", "texPC"):
        if mat[key].shape[0] != 3 * V:
            raise ValueError(f"{path}: {key} has shape {mat[key].shape}, expected 3 x {V} rows")
    return model_from_arrays(
        f"bfm2009:{path}", mean_shape=_interleaved(mat["shapeMU"], V) / 1000.0,
        id_basis=_pca_basis(mat["shapePC"], mat["shapeEV"], V, THETA_SIZES["id"]) / 1000.0,
        triangles=mat["tl"].astype(np.int64) - 1, landmarks=lm,
        mean_albedo=_interleaved(mat["texMU"], V) / 255.0,
        albedo_basis=_pca_basis(mat["texPC"], mat["texEV"], V, THETA_SIZES["albedo"]) / 255.0,
        recenter=recenter, license="Basel Face Model 2009 (see its license)")


def read_obj(path: str, num_vertices: Optional[int] = None, num_polygons: Optional[int] = None):
    """Read an OBJ's vertices and polygons (fan-triangulated), optionally only the first
    `num_vertices` / `num_polygons`.

    Returns:
        vertices (V, 3) float64, triangles (F, 3) int64 0-based, colours (V, 3) float64 from
        "v x y z r g b" lines, or None when a vertex line has no colour.
    """
    _require_file(path, "OBJ")
    with open(path) as f:
        lines = f.read().splitlines()
    v_lines = [line.split()[1:] for line in lines if line.startswith("v ")][:num_vertices]
    if not v_lines or min(len(v) for v in v_lines) < 3:
        raise ValueError(f"{path}: no vertices, or a vertex line with fewer than 3 numbers")
    width = 6 if min(len(v) for v in v_lines) >= 6 else 3
    table = np.array([v[:width] for v in v_lines], dtype=np.float64)  # (V, 3 or 6)
    triangles = []
    for face in [line for line in lines if line.startswith("f ")][:num_polygons]:
        ids = [int(token.split("/")[0]) - 1 for token in face.split()[1:]]
        triangles.extend((ids[0], ids[k], ids[k + 1]) for k in range(1, len(ids) - 1))
    colors = table[:, 3:6] if width == 6 else None
    return table[:, :3], np.array(triangles, dtype=np.int64).reshape(-1, 3), colors


def load_ict(directory: str, *, region: str = "narrow", landmarks=None, recenter: bool = True,
             blendshape_std: float = BLENDSHAPE_STD) -> MorphableModel:
    """Load an ICT-FaceKit checkout (module docs): OBJ morph targets in cm -> mm."""
    folder = os.path.join(directory, "FaceXModel")
    folder = folder if os.path.isdir(folder) else directory
    if not os.path.isfile(os.path.join(folder, "generic_neutral_mesh.obj")):
        raise FileNotFoundError(f"{directory}: no ICT-FaceKit model here (expected "
                                f"FaceXModel/generic_neutral_mesh.obj)")
    if region not in ICT_REGIONS and region != "all":
        raise ValueError(f"ICT region must be one of {sorted(ICT_REGIONS) + ['all']}, got {region!r}")
    num_v, num_p = ICT_REGIONS.get(region, (None, None))
    neutral, triangles, _ = read_obj(os.path.join(folder, "generic_neutral_mesh.obj"), num_v, num_p)
    if num_v is not None and neutral.shape[0] < num_v:
        raise ValueError(f"{folder}: generic_neutral_mesh.obj has {neutral.shape[0]} vertices, "
                         f"the {region!r} region needs {num_v}")

    def offsets(name):
        shape = read_obj(os.path.join(folder, name + ".obj"), num_v, 0)[0]
        if shape.shape != neutral.shape:
            raise ValueError(f"{folder}: {name}.obj has {shape.shape[0]} vertices, expected "
                             f"{neutral.shape[0]}")
        return 10.0 * (shape - neutral)  # (V, 3) mm

    identities = []
    while len(identities) < THETA_SIZES["id"] and os.path.isfile(
            os.path.join(folder, f"identity{len(identities):03d}.obj")):
        identities.append(offsets(f"identity{len(identities):03d}"))
    if not identities:
        raise ValueError(f"{folder}: no identity000.obj found")
    config = _require_file(os.path.join(folder, "vertex_indices.json"), "ICT-FaceKit config")
    with open(config) as f:
        names = json.load(f).get("expressions")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{config}: no 'expressions' list of names")
    names = names[:THETA_SIZES["exp"]]
    # an activation ~ N(0, s^2): one std of the coefficient is s x the full offset
    expressions = [blendshape_std * offsets(n) for n in names]
    lm = read_landmark_ids(landmarks) if landmarks is not None else np.array(ICT_LANDMARKS68)
    return model_from_arrays(
        f"ict:{directory}", mean_shape=10.0 * neutral, id_basis=np.stack(identities),
        triangles=triangles, landmarks=lm,
        exp_basis=np.stack(expressions) if expressions else None, exp_names=names,
        recenter=recenter, license="ICT-FaceKit, MIT license")


_LOADERS = {"npz": load_npz, "bfm2017": load_bfm2017, "bfm2009": load_bfm2009, "ict": load_ict}


def _option_value(text: str):
    """A spec option's value: int, float, bool ("true"/"false") or str."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", text):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def load_face_model(spec: str = "toy", **kwargs) -> MorphableModel:
    """Build or load a face model from a spec string.

    Specs: "toy" (kwargs: resolution), "npz:PATH", "bfm2017:PATH", "bfm2009:PATH", "ict:DIR".
    Keyword options may also follow the spec as ",key=value" (e.g. "toy,resolution=188",
    "bfm2017:model.h5,landmarks=lm68.txt"). Loader options: landmarks, recenter;
    blendshape_std (npz, ict); region (ict). See the module docstring for the formats.
    """
    head, *options = re.split(r",(?=[A-Za-z_]\w*=)", spec)
    for option in options:
        key, value = option.split("=", 1)
        if key in kwargs:
            raise ValueError(f"option {key!r} given both in the spec {spec!r} and as a keyword")
        kwargs[key] = _option_value(value)
    kind, colon, path = head.partition(":")
    if kind == "toy" and not colon:
        return toy_face_model(**kwargs)
    if kind not in _LOADERS or not path:
        raise ValueError(f"unknown face model spec {spec!r}: expected 'toy', 'npz:PATH', "
                         f"'bfm2017:PATH', 'bfm2009:PATH' or 'ict:DIR'")
    return _LOADERS[kind](path, **kwargs)


# ----------------------------------------------------------------------------- utilities

def mirror_permutation(model: MorphableModel) -> torch.Tensor:
    """For each vertex, the vertex nearest to its mirror image (x -> -x) on the mean shape.

    Exact for the toy model (its mean is mirror symmetric); approximate for scanned models.
    Returns (V,) long.
    """
    from scipy.spatial import cKDTree

    points = model.mean_shape.detach().cpu().double().numpy()  # (V, 3)
    _, nearest = cKDTree(points).query(points * np.array([-1.0, 1.0, 1.0]))
    return torch.as_tensor(nearest, dtype=torch.long)


def save_obj(path, vertices, triangles, colors=None) -> None:
    """Write a mesh as Wavefront OBJ: "v x y z [r g b]" lines and 1-based "f a b c" lines.

    Args:
        path: output file. vertices: (V, 3) tensor or array. triangles: (F, 3) integer
            vertex ids, 0-based. colors: optional (V, 3) per-vertex colours in [0, 1].
    """
    vertices, triangles = _numpy(vertices), _numpy(triangles)
    V = _check_array(vertices, (None, 3), "vertices")[0]
    _check_ids(triangles, (None, 3), V, "triangles")
    table = vertices.astype(np.float64)
    if colors is not None:
        colors = _numpy(colors)
        _check_array(colors, (V, 3), "colors")
        table = np.hstack([table, colors.astype(np.float64)])  # (V, 6)
    with open(path, "w") as f:
        f.write(f"# {V} vertices, {triangles.shape[0]} triangles\n")
        np.savetxt(f, table, fmt="v" + " %.6f" * table.shape[1])
        np.savetxt(f, triangles.astype(np.int64) + 1, fmt="f %d %d %d")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build or load a face model and summarize it.")
    parser.add_argument("spec", nargs="?", default="toy", help="face model spec (module docs)")
    parser.add_argument("--obj", help="write the mean face with its mean albedo to this OBJ file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = load_face_model(args.spec)
    seconds = time.perf_counter() - start
    lo, hi = model.mean_shape.min(0).values.tolist(), model.mean_shape.max(0).values.tolist()
    # rms over vertices of the displacement per std, mm
    rms = lambda basis: basis.square().sum(-1).mean(-1).sqrt()  # (K,)
    print(f"{model.name}: {model.num_vertices} vertices, {model.num_faces} triangles, "
          f"built in {seconds:.2f} s")
    print("extent mm: " + ", ".join(f"{a} [{l:.0f}, {h:.0f}]" for a, l, h in zip("xyz", lo, hi)))
    print("rms mm per std of the first modes: identity "
          + " ".join(f"{r:.2f}" for r in rms(model.id_basis)[:4].tolist()) + ", expression "
          + " ".join(f"{r:.2f}" for r in rms(model.exp_basis)[:4].tolist()))
    if args.obj:
        save_obj(args.obj, model.mean_shape, model.triangles, model.mean_albedo.clamp(0, 1))
        print(f"wrote {args.obj}")


if __name__ == "__main__":
    main()
