"""The 3D morphable face model: the theta layout, the linear model, its landmark conventions.

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
  `NOSE_TIP_DEPTH` = 95 mm straight behind the nose tip (`center_behind_nose`), so rotations
  about it look natural and theta = 0 frames the face from the brows to the chin in the
  renderer's 224 x 224 view.
- Triangles (F, 3) long are counter-clockwise seen from the front (+z).
- 68 landmarks in the iBUG / Multi-PIE convention (0-based: jaw 0-16, brows 17-26, nose
  bridge 27-30, nostrils 31-35, eyes 36-47, outer lip 48-59, inner lip 60-67); point 0 is on
  the subject's right (x < 0). `LANDMARK_MIRROR` is the left/right flip of these ids and
  `LANDMARK_WEIGHTS` the per-landmark weights of Eq. 7 (the one source; `losses.py` reads it);
  `five_points` reduces the 68 to Deep3D's 5 alignment points (`FIVE_POINTS`), which the
  photo crops (data.py) and the perceptual network's crops (perceptual.py) both use.
- theta (B, 257) = id 80 | exp 64 | albedo 80 | sh 27 | pose 6 (`THETA_SIZES`, `split_theta`).
- Every model holds bases at exactly these sizes: a file with more modes keeps the leading
  ones, a file with fewer gets zero modes (their coefficients have no effect).

Where the models come from: `toy_face.py` builds the default toy model in code (and
`make_albedo`, the albedo model of meshes that have none); `face_models.py` loads real models
from files (BFM 2017 / 2009, ICT-FaceKit, our .npz schema) and holds `load_face_model(spec)`,
the one entry point the other modules use.

Deviations from the paper: the paper uses BFM 2017, which cannot be shipped; the default is a
toy model with the same interface (`toy_face.py`), and real models load from user files.

`python -m pytest -q tests/test_bfm.py` tests this module; `python face_models.py` builds the
toy model and prints its summary.
"""
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

THETA_SIZES = {"id": 80, "exp": 64, "albedo": 80, "sh": 27, "pose": 6}  # 257, Sec. 3.1
NOSE_TIP_DEPTH = 95.0  # mm from the model-space origin to the nose tip along +z

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
# the 68-landmark ids averaged into each of the 5 points (Deep3D's `extract_5p`): the
# subject's right eye (corners 36, 39), left eye (42, 45), nose tip, right and left mouth corner
FIVE_POINTS = ((36, 39), (42, 45), (30,), (48,), (54,))


def five_points(landmarks):
    """Deep3D's 5 points (..., 5, D) from 68 landmarks (..., 68, D), in 2D or 3D: the means
    of the landmarks of `FIVE_POINTS` (eye centres, nose tip, mouth corners). An array or
    list gives a float64 numpy array; a tensor gives a tensor of its dtype, differentiable."""
    if torch.is_tensor(landmarks):
        return torch.stack([landmarks[..., list(ids), :].mean(-2) for ids in FIVE_POINTS], -2)
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[..., list(ids), :].mean(-2) for ids in FIVE_POINTS], -2)


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
        V = check_array(mean_shape, (None, 3), "mean_shape")[0]
        check_array(id_basis, (THETA_SIZES["id"], V, 3), "id_basis")
        check_array(exp_basis, (THETA_SIZES["exp"], V, 3), "exp_basis")
        check_array(albedo_basis, (THETA_SIZES["albedo"], V, 3), "albedo_basis")
        check_array(mean_albedo, (V, 3), "mean_albedo")
        check_ids(triangles, (None, 3), V, "triangles")
        check_ids(landmarks, (68,), V, "landmarks")
        self.register_buffer("mean_shape", to_float32(mean_shape))
        self.register_buffer("id_basis", to_float32(id_basis))
        self.register_buffer("exp_basis", to_float32(exp_basis))
        self.register_buffer("mean_albedo", to_float32(mean_albedo))
        self.register_buffer("albedo_basis", to_float32(albedo_basis))
        self.register_buffer("triangles", to_long(triangles))
        self.register_buffer("landmarks", to_long(landmarks))
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

    def vertices(self, id_coeff: torch.Tensor, exp_coeff: torch.Tensor,
                 indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Shape S = S_mean + sum_k alpha_id_k B_id_k + sum_k alpha_exp_k B_exp_k (Sec. 3.1).

        Args:
            id_coeff: (B, 80) identity coefficients, std units.
            exp_coeff: (B, 64) expression coefficients, std units.
            indices: (N,) the vertices to compute, e.g. `landmarks` (None: all V). Only their
                rows of the bases enter the products: fitting's landmark stage needs 68
                vertices, not thousands.
        Returns:
            (B, V, 3) vertices in model space, mm ((B, N, 3) with `indices`).
        """
        B = _check_coeff(id_coeff, THETA_SIZES["id"], "id_coeff")
        _check_coeff(exp_coeff, THETA_SIZES["exp"], "exp_coeff", batch=B)
        mean, id_basis, exp_basis = self.mean_shape, self.id_basis, self.exp_basis
        if indices is not None:
            mean, id_basis, exp_basis = mean[indices], id_basis[:, indices], exp_basis[:, indices]
        V = mean.shape[0]
        # sum_k alpha_k B_k: one matrix product per basis, on the flattened (K, 3V) bases
        offsets = id_coeff @ id_basis.reshape(-1, 3 * V)  # (B, 3V)
        offsets = offsets + exp_coeff @ exp_basis.reshape(-1, 3 * V)  # (B, 3V)
        return mean + offsets.view(B, V, 3)  # (B, V, 3)

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


# ----------------------------------------------------------------------------- checks

def to_numpy(array) -> np.ndarray:
    """A tensor (detached, on the CPU) or anything array-like as a numpy array."""
    return array.detach().cpu().numpy() if torch.is_tensor(array) else np.asarray(array)


def to_float32(array) -> torch.Tensor:
    """A tensor or array as a contiguous float32 tensor."""
    return torch.as_tensor(to_numpy(array).astype(np.float32)).contiguous()


def to_long(array) -> torch.Tensor:
    """A tensor or array as a contiguous int64 tensor."""
    return torch.as_tensor(to_numpy(array).astype(np.int64)).contiguous()


def check_array(array, shape, name, source=""):
    """Check an array's shape (None matches any size) and that it is finite; returns the shape."""
    actual = tuple(array.shape) if hasattr(array, "shape") else None
    ok = actual is not None and len(actual) == len(shape) and all(
        s is None or s == a for s, a in zip(shape, actual))
    if not ok:
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{source}{name} must have shape {want}, got {actual}")
    values = to_numpy(array)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{source}{name} must be numeric, got dtype {values.dtype}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"{source}{name} contains NaN or infinite values")
    return actual


def check_ids(ids, shape, num_vertices, name, source=""):
    """Check an integer array of vertex ids: shape and range [0, num_vertices)."""
    check_array(ids, shape, name, source)
    values = to_numpy(ids)
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


# ----------------------------------------------------------------------------- utilities

def center_behind_nose(mean_shape, landmarks):
    """Translate (V, 3) points (numpy or torch) so the origin is NOSE_TIP_DEPTH straight
    behind the nose tip (landmark 30).

    With the renderer's camera (1014.72 px at 224 x 224, 1 m away) theta = 0 then frames the
    face from the brows to the chin, as an aligned 224 x 224 crop does."""
    origin = mean_shape[landmarks[30]] * 1.0  # a copy
    origin[2] = origin[2] - NOSE_TIP_DEPTH
    return mean_shape - origin


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
    vertices, triangles = to_numpy(vertices), to_numpy(triangles)
    V = check_array(vertices, (None, 3), "vertices")[0]
    check_ids(triangles, (None, 3), V, "triangles")
    table = vertices.astype(np.float64)
    if colors is not None:
        colors = to_numpy(colors)
        check_array(colors, (V, 3), "colors")
        table = np.hstack([table, colors.astype(np.float64)])  # (V, 6)
    with open(path, "w") as f:
        f.write(f"# {V} vertices, {triangles.shape[0]} triangles\n")
        np.savetxt(f, table, fmt="v" + " %.6f" * table.shape[1])
        np.savetxt(f, triangles.astype(np.int64) + 1, fmt="f %d %d %d")
