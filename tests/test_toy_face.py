"""Tests for toy_face.py: the toy morphable model (sizes, symmetry, landmarks, bases,
determinism, build time) and `make_albedo`."""
import time

import pytest
import torch

import bfm
import toy_face


@pytest.fixture(scope="module")
def toy():
    return toy_face.toy_face_model(64)


@pytest.fixture(scope="module")
def small():
    """A coarse toy model (400-odd vertices): quick to build again and to check against."""
    return toy_face.toy_face_model(20)


# ----------------------------------------------------------------------------- toy model

def test_toy_shapes_and_dtypes(toy):
    V, F = 64 * 65, 2 * 63 * 64
    assert (toy.num_vertices, toy.num_faces) == (V, F)
    shapes = {"mean_shape": (V, 3), "id_basis": (80, V, 3), "exp_basis": (64, V, 3),
              "mean_albedo": (V, 3), "albedo_basis": (80, V, 3), "triangles": (F, 3),
              "landmarks": (68,), "landmark_weights": (68,)}
    buffers = dict(toy.named_buffers())
    assert set(buffers) == set(shapes)
    for name, shape in shapes.items():
        assert tuple(buffers[name].shape) == shape, name
        assert buffers[name].dtype == (torch.long if name in ("triangles", "landmarks") else torch.float32)
        assert torch.isfinite(buffers[name].float()).all(), name
    assert toy.name == "toy:64" and len(toy.exp_names) == 64 and len(set(toy.exp_names)) == 64
    assert toy.exp_names[0] == "jaw_open"
    assert torch.equal(toy.landmark_weights, torch.tensor(bfm.LANDMARK_WEIGHTS))
    assert len(set(toy.landmarks.tolist())) == 68
    assert set(toy.triangles.flatten().tolist()) == set(range(V))  # no unused vertex


@pytest.mark.parametrize("resolution, vertices, faces", [(17, 289, 512), (133, 17689, 34848)])
def test_toy_resolution_sizes(resolution, vertices, faces):
    rows, cols, _ = toy_face._toy_grid(resolution).shape
    assert (rows * cols, toy_face._toy_triangles(rows, cols).shape[0]) == (vertices, faces)


def test_toy_rejects_bad_resolution():
    with pytest.raises(ValueError, match="resolution"):
        toy_face.toy_face_model(15)
    with pytest.raises(ValueError, match="resolution"):
        toy_face.toy_face_model(40.0)


def test_toy_is_mirror_symmetric(toy):
    perm = bfm.mirror_permutation(toy)
    assert torch.equal(perm[perm], torch.arange(toy.num_vertices))
    flip = torch.tensor([-1.0, 1.0, 1.0])
    assert torch.allclose(toy.mean_shape[perm], toy.mean_shape * flip, atol=1e-4)
    assert torch.allclose(toy.mean_albedo[perm], toy.mean_albedo, atol=1e-4)
    # the triangulation is its own mirror image (mirrored triangles are clockwise)
    mirrored = {tuple(sorted(t)) for t in perm[toy.triangles].tolist()}
    assert mirrored == {tuple(sorted(t)) for t in toy.triangles.tolist()}
    # landmark k mirrors onto landmark LANDMARK_MIRROR[k]: 0 <-> 16, 36 <-> 45, 48 <-> 54, ...
    assert perm[toy.landmarks].tolist() == toy.landmarks[list(bfm.LANDMARK_MIRROR)].tolist()
    # every identity mode is a mirror-symmetric or an antisymmetric field
    mirrored_modes = toy.id_basis[:, perm] * flip  # (80, V, 3)
    scale = toy.id_basis.abs().amax(dim=(1, 2))  # (80,)
    sym = (mirrored_modes - toy.id_basis).abs().amax(dim=(1, 2)) / scale
    anti = (mirrored_modes + toy.id_basis).abs().amax(dim=(1, 2)) / scale
    assert (torch.minimum(sym, anti) < 1e-3).all()
    assert (sym < 1e-3).sum() > 50  # mostly symmetric faces


def test_toy_extent_and_landmark_places(toy):
    p = toy.mean_shape
    lo, hi = p.min(0).values, p.max(0).values
    assert -80 < lo[0] < -70 and 70 < hi[0] < 80  # x: about +-75
    assert -85 < lo[1] < -70 and 110 < hi[1] < 125  # y: chin to upper forehead
    assert -5 < lo[2] < 5 and 90 < hi[2] < 100  # z: face sides to nose tip
    lm = p[toy.landmarks]  # (68, 3)
    assert lm[:, 2].argmax() == 30 and abs(lm[30, 2] - bfm.NOSE_TIP_DEPTH) < 2
    assert lm[8, 1] == lm[:, 1].min() and lm[8, 0] == 0  # chin lowest, on the midline
    assert lm[36:48, 1].min() > lm[48:68, 1].max()  # eyes above the mouth
    assert lm[17:27, 1].min() > lm[36:48, 1].max()  # brows above the eyes
    assert lm[36:48, 1].min() > lm[30, 1] > lm[48:68, 1].max()  # nose tip in between
    assert lm[[61, 62, 63], 1].min() > lm[[65, 66, 67], 1].max()  # upper inner lip above lower
    assert lm[36, 0] < lm[39, 0] < 0 < lm[42, 0] < lm[45, 0]  # point 0 side is x < 0
    assert lm[0, 0] < -60 and lm[16, 0] > 60 and lm[48, 0] < 0 < lm[54, 0]
    assert (lm[[27, 28, 29, 30, 33, 51, 57, 62, 66], 0] == 0).all()
    assert lm[30, :2].abs().max() < 1e-4  # the origin is straight behind the nose tip


def test_toy_landmarks_stable_across_resolutions(toy):
    fine = toy_face.toy_face_model(101)
    a, b = toy.mean_shape[toy.landmarks], fine.mean_shape[fine.landmarks]
    assert (a - b).norm(dim=-1).max() < 4.0


def test_toy_triangles_face_the_viewer(toy):
    a, b, c = toy.mean_shape[toy.triangles].unbind(1)  # (F, 3) each
    normals = torch.cross(b - a, c - a, dim=-1)  # (F, 3), area-weighted
    centroid = (a + b + c) / 3
    frontal = centroid[:, 0].abs() < 40
    n = normals[frontal]
    assert n.sum(0)[2] > 0.9 * n.sum(0).norm()
    assert (n[:, 2] > 0).float().mean() > 0.97
    assert (normals.norm(dim=-1) > 0).all()  # no degenerate triangle


def test_toy_is_deterministic(small):
    again = toy_face.toy_face_model(20)
    for (name, x), (_, y) in zip(small.named_buffers(), again.named_buffers()):
        assert torch.equal(x, y), name
    assert again.exp_names == small.exp_names


def test_toy_bases_have_plausible_magnitudes(toy):
    rms = lambda basis: basis.square().sum(-1).mean(-1).sqrt()  # (K,) mm per std
    id_rms = rms(toy.id_basis)
    assert 2.0 < id_rms[0] < 5.0 and (id_rms > 0.05).all()
    assert id_rms[:10].mean() > 4 * id_rms[-10:].mean()  # ranked by variance
    exp_max = toy.exp_basis.norm(dim=-1).amax(dim=1)  # (64,) largest displacement per mode
    assert (exp_max > 1.0).all() and (exp_max < 20.0).all()
    chin = toy.exp_basis[0, toy.landmarks[8]].norm()
    assert 8.0 < chin < 18.0  # jaw open
    forehead = toy.exp_basis[0, toy.landmarks[27]].norm()
    assert forehead < 0.1  # localized: the jaw mode leaves the upper face alone
    alb_rms = toy.albedo_basis.square().mean(dim=(1, 2)).sqrt()  # per channel
    assert 0.03 < alb_rms[0] < 0.07 and alb_rms[:10].mean() > 4 * alb_rms[-10:].mean()
    g = torch.Generator().manual_seed(0)
    faces = toy.vertices(torch.randn(16, 80, generator=g), torch.zeros(16, 64))
    assert (faces - toy.mean_shape).norm(dim=-1).amax() < 30.0


# ----------------------------------------------------------------------------- albedo

def test_toy_albedo_paints_brows_lips_eyes(toy):
    alb, lm = toy.mean_albedo, toy.landmarks
    assert alb.min() >= 0 and alb.max() <= 1
    forehead = alb[toy.mean_shape[:, 1].argmax()]
    brow = alb[lm[19]]
    assert brow.sum() < 0.7 * forehead.sum()
    nearest = lambda point: torch.cdist(point[None, :2], toy.mean_shape[:, :2]).argmin()
    lip = alb[nearest(toy.mean_shape[lm[[57, 66]]].mean(0))]  # inside the lower lip
    assert lip[0] / lip[1] > 1.3 * forehead[0] / forehead[1]  # redder than skin
    pupils = alb[nearest(toy.mean_shape[lm[36:42]].mean(0))]
    assert pupils.sum() < 0.5 * forehead.sum()


def test_make_albedo_on_another_mesh(small, toy):
    # the same construction on a coarser mesh of the same face paints the same colours
    mean, basis = toy_face.make_albedo(small.mean_shape.numpy(), small.landmarks.numpy(), num_modes=12)
    assert mean.shape == (small.num_vertices, 3) and basis.shape == (12, small.num_vertices, 3)
    assert torch.allclose(mean, small.mean_albedo) and torch.allclose(basis, small.albedo_basis[:12])
    lm_small, lm_toy = small.landmarks[[2, 19, 30]], toy.landmarks[[2, 19, 30]]
    assert (small.mean_albedo[lm_small] - toy.mean_albedo[lm_toy]).abs().max() < 0.15
    with pytest.raises(ValueError, match="landmarks"):
        toy_face.make_albedo(small.mean_shape, small.landmarks + small.num_vertices)
    with pytest.raises(ValueError, match="vertices"):
        toy_face.make_albedo(small.mean_shape[:, :2], small.landmarks)


# ----------------------------------------------------------------------------- build time and numerics

def test_build_time_large_resolution():
    start, cpu = time.perf_counter(), time.process_time()
    model = toy_face.toy_face_model(188)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"\ntoy resolution 188: {model.num_vertices} vertices, {model.num_faces} triangles, "
          f"built in {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert (model.num_vertices, model.num_faces) == (35532, 70312)
    assert wall < 30.0  # about 1 s on an idle 2-core CPU; generous for shared machines


@pytest.mark.parametrize("eps", [1e-12, -1e-12])
def test_eigen_signs_do_not_depend_on_rounding(eps):
    """A mirror-antisymmetric mode has two entries of equal size and opposite sign; rounding
    (e.g. LAPACK's thread count) decides which is larger, and must not decide the sign."""
    v = torch.tensor([0.6, 0.2, -0.2, -0.6], dtype=torch.float64)
    v = v / v.norm()
    w = torch.full((4,), 0.5, dtype=torch.float64)
    k = 3 * torch.outer(v, v) + torch.outer(w, w)
    k[0, 0] += eps  # tip the tie one way or the other
    k[3, 3] -= eps
    _, u = toy_face._eig_desc(k)
    assert u[0, 0] > 0 and u[3, 0] < 0  # the first of the tied entries is the positive one
