"""Tests for bfm.py: theta layout, the toy morphable model, loaders, OBJ export."""
import copy
import json
import os
import sys
import time

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, strategies as st

import bfm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ICT_NPZ = os.path.join(ROOT, "..", "shared", "face_models", "ict_facekit_narrow.npz")


@pytest.fixture(scope="module")
def toy():
    return bfm.toy_face_model(64)


@pytest.fixture(scope="module")
def toy64(toy):
    return copy.deepcopy(toy).double()


@pytest.fixture(scope="module")
def small():
    """A coarse toy model, the source of the synthetic files the loader tests write."""
    return bfm.toy_face_model(20)


# ----------------------------------------------------------------------------- theta layout

@given(batch=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_split_join_theta_round_trip(batch, seed):
    theta = torch.randn(batch, 257, generator=torch.Generator().manual_seed(seed))
    parts = bfm.split_theta(theta)
    assert [p.shape for p in parts] == [(batch, n) for n in (80, 64, 80, 27, 6)]
    assert parts._fields == ("id", "exp", "albedo", "sh", "pose")
    assert torch.equal(parts.exp, theta[:, 80:144]) and torch.equal(parts.pose, theta[:, 251:])
    assert torch.equal(bfm.join_theta(parts), theta)


def test_split_theta_returns_views():
    theta = torch.zeros(2, 257)
    bfm.split_theta(theta).sh[:] = 1.0
    assert theta[:, 224:251].eq(1).all() and theta.sum() == 2 * 27


@pytest.mark.parametrize("shape", [(2, 256), (2, 258), (257,), (1, 2, 257)])
def test_split_theta_rejects_wrong_size(shape):
    with pytest.raises(ValueError, match="257"):
        bfm.split_theta(torch.zeros(shape))


def test_join_theta_rejects_bad_parts():
    parts = bfm.split_theta(torch.zeros(3, 257))
    with pytest.raises(ValueError, match="sh"):
        bfm.join_theta(parts._replace(sh=torch.zeros(3, 26)))
    with pytest.raises(ValueError, match="pose"):
        bfm.join_theta(parts._replace(pose=torch.zeros(2, 6)))
    assert sum(bfm.THETA_SIZES.values()) == 257


def test_landmark_weights_and_mirror_table():
    w = bfm.LANDMARK_WEIGHTS
    assert len(w) == 68 and {k for k in range(68) if w[k] == 20} == {28, 29, 30, *range(60, 68)}
    assert all(w[k] == 1 for k in range(68) if w[k] != 20)
    m = bfm.LANDMARK_MIRROR
    assert sorted(m) == list(range(68)) and all(m[m[k]] == k for k in range(68))
    assert (m[0], m[8], m[17], m[30], m[36], m[39], m[48], m[51], m[60], m[66]) == (
        16, 8, 26, 30, 45, 42, 54, 51, 64, 66)


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
    rows, cols, _ = bfm._toy_grid(resolution).shape
    assert (rows * cols, bfm._toy_triangles(rows, cols).shape[0]) == (vertices, faces)


def test_zero_coefficients_give_the_mean(toy):
    verts = toy.vertices(torch.zeros(3, 80), torch.zeros(3, 64))
    assert verts.shape == (3, toy.num_vertices, 3) and torch.equal(verts[1], toy.mean_shape)
    albedo = toy.albedo(torch.zeros(2, 80))
    assert albedo.shape == (2, toy.num_vertices, 3) and torch.equal(albedo[0], toy.mean_albedo)


@given(a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 2 ** 16))
def test_vertices_and_albedo_are_linear(toy64, a, b, seed):
    g = torch.Generator().manual_seed(seed)
    i1, i2 = torch.randn(2, 80, generator=g, dtype=torch.float64).unbind(0)
    e1, e2 = torch.randn(2, 64, generator=g, dtype=torch.float64).unbind(0)
    offset = lambda i, e: toy64.vertices(i[None], e[None])[0] - toy64.mean_shape
    combined = offset(a * i1 + b * i2, a * e1 + b * e2)
    assert torch.allclose(combined, a * offset(i1, e1) + b * offset(i2, e2), atol=1e-9)
    alb = lambda c: toy64.albedo(c[None])[0] - toy64.mean_albedo
    assert torch.allclose(alb(a * i1 + b * i2), a * alb(i1) + b * alb(i2), atol=1e-12)
    # one batch row does not depend on the others, and each mode adds its basis vector
    both = toy64.vertices(torch.stack([i1, i2]), torch.stack([e1, e2]))
    assert torch.allclose(both[1] - toy64.mean_shape, offset(i2, e2), atol=1e-9)
    unit = torch.zeros(1, 80, dtype=torch.float64)
    unit[0, seed % 80] = a
    step = toy64.vertices(unit, torch.zeros(1, 64, dtype=torch.float64))[0] - toy64.mean_shape
    assert torch.allclose(step, a * toy64.id_basis[seed % 80], atol=1e-12)


def test_vertices_backward_is_the_basis(toy):
    coeff = torch.zeros(1, 80, requires_grad=True)
    weights = torch.rand(toy.num_vertices, 3, generator=torch.Generator().manual_seed(0))
    (toy.vertices(coeff, torch.zeros(1, 64)) * weights).sum().backward()
    expected = (toy.id_basis * weights).sum(dim=(1, 2))
    assert torch.allclose(coeff.grad[0], expected, rtol=1e-4, atol=1e-3)


def test_coefficient_shape_errors(toy):
    with pytest.raises(ValueError, match="id_coeff"):
        toy.vertices(torch.zeros(2, 79), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="exp_coeff"):
        toy.vertices(torch.zeros(2, 80), torch.zeros(3, 64))
    with pytest.raises(ValueError, match="albedo_coeff"):
        toy.albedo(torch.zeros(80))
    with pytest.raises(ValueError, match="resolution"):
        bfm.toy_face_model(15)
    with pytest.raises(ValueError, match="resolution"):
        bfm.toy_face_model(40.0)


def test_model_moves_with_dtype(toy64):
    assert all(t.dtype == torch.float64 for n, t in toy64.named_buffers()
               if n not in ("triangles", "landmarks"))
    out = toy64.vertices(torch.zeros(1, 80, dtype=torch.float64), torch.zeros(1, 64, dtype=torch.float64))
    assert out.dtype == torch.float64 and toy64.triangles.dtype == torch.long


def test_constructor_rejects_wrong_mode_counts(small):
    parts = dict(small.named_buffers())
    args = [parts[k] for k in ("mean_shape", "id_basis", "exp_basis", "mean_albedo",
                               "albedo_basis", "triangles", "landmarks")]
    args[1] = args[1][:79]
    with pytest.raises(ValueError, match="id_basis"):
        bfm.MorphableModel(*args, name="bad")


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
    fine = bfm.toy_face_model(101)
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
    again = bfm.toy_face_model(20)
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
    mean, basis = bfm.make_albedo(small.mean_shape.numpy(), small.landmarks.numpy(), num_modes=12)
    assert mean.shape == (small.num_vertices, 3) and basis.shape == (12, small.num_vertices, 3)
    assert torch.allclose(mean, small.mean_albedo) and torch.allclose(basis, small.albedo_basis[:12])
    lm_small, lm_toy = small.landmarks[[2, 19, 30]], toy.landmarks[[2, 19, 30]]
    assert (small.mean_albedo[lm_small] - toy.mean_albedo[lm_toy]).abs().max() < 0.15
    with pytest.raises(ValueError, match="landmarks"):
        bfm.make_albedo(small.mean_shape, small.landmarks + small.num_vertices)
    with pytest.raises(ValueError, match="vertices"):
        bfm.make_albedo(small.mean_shape[:, :2], small.landmarks)


def test_fit_modes_keeps_leading_or_pads():
    basis = torch.randn(5, 7, 3)
    assert torch.equal(bfm.fit_modes(basis, 3, 7), basis[:3])
    padded = bfm.fit_modes(basis.numpy(), 8, 7)
    assert padded.shape == (8, 7, 3) and torch.equal(padded[:5], basis) and (padded[5:] == 0).all()
    assert (bfm.fit_modes(None, 4, 7) == 0).all()


def test_build_time_large_resolution():
    start, cpu = time.perf_counter(), time.process_time()
    model = bfm.load_face_model("toy", resolution=188)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"\ntoy resolution 188: {model.num_vertices} vertices, {model.num_faces} triangles, "
          f"built in {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert (model.num_vertices, model.num_faces) == (35532, 70312)
    assert wall < 30.0  # about 1 s on an idle 2-core CPU; generous for shared machines


# ----------------------------------------------------------------------------- specs

def test_load_face_model_specs(small):
    model = bfm.load_face_model("toy,resolution=20")
    assert model.name == "toy:20" and torch.equal(model.mean_shape, small.mean_shape)
    with pytest.raises(ValueError, match="unknown face model spec"):
        bfm.load_face_model("bfm2019:x.h5")
    with pytest.raises(ValueError, match="unknown face model spec"):
        bfm.load_face_model("npz:")
    with pytest.raises(ValueError, match="both"):
        bfm.load_face_model("toy,resolution=20", resolution=30)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        bfm.load_face_model("npz:/nonexistent/missing.npz")


# ----------------------------------------------------------------------------- npz loader

def npz_arrays(model, **extra):
    arrays = {"mean_shape": model.mean_shape.numpy(),
              "id_basis": np.concatenate([model.id_basis.numpy()] * 2)[:90],  # 90 modes
              "triangles": model.triangles.numpy().astype(np.int32),
              "landmarks68": model.landmarks.numpy().astype(np.int32),
              "exp_basis": model.exp_basis.numpy()[:10].astype(np.float16)}
    arrays.update(extra)
    return {k: v for k, v in arrays.items() if v is not None}


def test_npz_loads_and_fits_mode_counts(small, tmp_path):
    path = str(tmp_path / "face.npz")
    np.savez(path, **npz_arrays(small))
    model = bfm.load_face_model(f"npz:{path}", recenter=False)
    assert model.name == f"npz:{path}" and model.num_vertices == small.num_vertices
    assert torch.allclose(model.mean_shape, small.mean_shape)
    assert torch.allclose(model.id_basis, small.id_basis)  # the leading 80 of 90 modes kept
    assert torch.allclose(model.exp_basis[:10], small.exp_basis[:10], atol=1e-2)  # float16
    assert (model.exp_basis[10:] == 0).all()  # fewer modes: zero modes
    assert torch.equal(model.triangles, small.triangles) and torch.equal(model.landmarks, small.landmarks)
    # no albedo in the file: the same construction as the toy model's, on this mesh
    assert torch.allclose(model.mean_albedo, small.mean_albedo, atol=1e-5)
    assert torch.allclose(model.albedo_basis, small.albedo_basis, atol=1e-5)


def test_npz_recenters_and_scales_blendshapes(small, tmp_path):
    path = str(tmp_path / "face.npz")
    offset = np.array([3.0, 40.0, 30.0], dtype=np.float32)
    names = np.array([f"shape{k}" for k in range(10)])
    np.savez(path, **npz_arrays(small, mean_shape=small.mean_shape.numpy() + offset, exp_names=names))
    model = bfm.load_face_model(f"npz:{path}")  # recenter=True by default
    lm = model.mean_shape[model.landmarks]
    assert abs(lm[30, 2] - bfm.NOSE_TIP_DEPTH) < 1e-3
    assert lm[30, :2].abs().max() < 1e-3
    assert model.exp_names == tuple(names)
    # named expressions are blendshapes: one std = BLENDSHAPE_STD x the full offset
    assert torch.allclose(model.exp_basis[:10], bfm.BLENDSHAPE_STD * small.exp_basis[:10], atol=1e-2)
    pca = bfm.load_face_model(f"npz:{path}", blendshape_std=1.0)
    assert torch.allclose(pca.exp_basis[:10], small.exp_basis[:10], atol=1e-2)


def test_npz_flips_clockwise_triangles_and_takes_landmark_file(small, tmp_path):
    path = str(tmp_path / "face.npz")
    np.savez(path, **npz_arrays(small, triangles=small.triangles.numpy()[:, ::-1].copy(),
                                landmarks68=None))
    lm_file = tmp_path / "lm68.txt"
    lm_file.write_text("# ids\n" + ", ".join(map(str, small.landmarks.tolist())) + "\n")
    model = bfm.load_face_model(f"npz:{path},landmarks={lm_file}")
    assert torch.equal(model.triangles, small.triangles)
    assert torch.equal(model.landmarks, small.landmarks)


@pytest.mark.parametrize("case, change, message", [
    ("missing key", lambda V: {"id_basis": None}, "id_basis"),
    ("missing landmarks", lambda V: {"landmarks68": None}, "landmarks68"),
    ("wrong basis shape", lambda V: {"id_basis": np.zeros((5, V + 1, 3))}, "id_basis"),
    ("wrong mean shape", lambda V: {"mean_shape": np.zeros((V, 2))}, "mean_shape"),
    ("triangle id out of range", lambda V: {"triangles": np.array([[0, 1, V]])}, "triangles"),
    ("negative triangle id", lambda V: {"triangles": np.array([[0, 1, -1]])}, "triangles"),
    ("float triangles", lambda V: {"triangles": np.array([[0.0, 1.0, 2.0]])}, "triangles"),
    ("landmark id out of range", lambda V: {"landmarks68": np.full(68, V)}, "landmarks"),
    ("67 landmarks", lambda V: {"landmarks68": np.arange(67)}, "landmarks"),
    ("NaN in the mean", lambda V: {"mean_shape": np.full((V, 3), np.nan)}, "mean_shape"),
    ("wrong albedo shape", lambda V: {"mean_albedo": np.zeros((V - 1, 3))}, "mean_albedo"),
    ("bad exp_kind", lambda V: {"exp_kind": np.array("pcb")}, "exp_kind"),
])
def test_npz_bad_files_name_the_file(small, tmp_path, case, change, message):
    path = str(tmp_path / "bad_model.npz")
    np.savez(path, **npz_arrays(small, **change(small.num_vertices)))
    with pytest.raises(ValueError) as err:
        bfm.load_face_model(f"npz:{path}")
    assert path in str(err.value) and message in str(err.value), case


def test_npz_not_a_zip_names_the_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.npz"):
        bfm.load_face_model(f"npz:{path}")


@pytest.mark.skipif(not os.path.isfile(ICT_NPZ), reason="ICT-FaceKit npz not present")
def test_ict_npz_loads():
    model = bfm.load_face_model(f"npz:{ICT_NPZ}")
    assert (model.num_vertices, model.num_faces) == (6706, 13120)
    assert len(model.exp_names) == 53 and model.exp_names[26] == "jawOpen"
    assert (model.exp_basis[53:] == 0).all() and (model.id_basis.abs().amax(dim=(1, 2)) > 0).all()
    lm = model.mean_shape[model.landmarks]
    assert abs(lm[30, 2] - bfm.NOSE_TIP_DEPTH) < 1e-3 and lm[8, 1] == lm[:, 1].min()
    assert torch.equal(model.landmarks, torch.tensor(bfm.ICT_LANDMARKS68))
    # one std of jawOpen (0.5 x full activation) opens the jaw by about 20 mm at the chin
    assert 10 < model.exp_basis[26, model.landmarks[8]].norm() < 30
    assert "MIT" in model.license and 0 <= model.mean_albedo.min() and model.mean_albedo.max() <= 1
    a, b, c = model.mean_shape[model.triangles].unbind(1)
    assert torch.cross(b - a, c - a, dim=-1).sum(0)[2] > 0  # counter-clockwise from the front
    # its landmarks are (nearly) mirror symmetric, like the toy model's
    mirrored = lm[list(bfm.LANDMARK_MIRROR)] * torch.tensor([-1.0, 1.0, 1.0])
    assert (mirrored - lm).norm(dim=-1).max() < 3.0


# ----------------------------------------------------------------------------- BFM loaders

def write_lm(tmp_path, model):
    path = tmp_path / "bfm_landmarks68.txt"
    path.write_text("\n".join(map(str, model.landmarks.tolist())))
    return str(path)


def bfm2009_arrays(model, **change):
    V = model.num_vertices
    flat = lambda basis: basis.reshape(basis.shape[0], 3 * V).T  # (3V, K), unit-free
    shape_pc, shape_ev = flat(model.id_basis.double().numpy()), np.linspace(2.0, 1.0, 80)[:, None]
    tex_pc, tex_ev = flat(model.albedo_basis.double().numpy()), np.linspace(3.0, 1.0, 80)[:, None]
    arrays = {"shapeMU": model.mean_shape.double().numpy().reshape(-1, 1) * 1000.0,  # um
              "shapePC": shape_pc, "shapeEV": shape_ev * 1000.0,
              "texMU": model.mean_albedo.double().numpy().reshape(-1, 1) * 255.0,
              "texPC": tex_pc, "texEV": tex_ev * 255.0,
              "tl": model.triangles.numpy().astype(np.float64) + 1}  # 1-based, as in the .mat
    arrays.update(change)
    return {k: v for k, v in arrays.items() if v is not None}


def test_bfm2009_loads_with_unit_conversions(small, tmp_path):
    path = str(tmp_path / "01_MorphableModel.mat")
    scipy.io.savemat(path, bfm2009_arrays(small))
    model = bfm.load_face_model(f"bfm2009:{path}", landmarks=write_lm(tmp_path, small), recenter=False)
    assert torch.allclose(model.mean_shape, small.mean_shape, atol=1e-4)
    ev = torch.linspace(2.0, 1.0, 80)[:, None, None]
    assert torch.allclose(model.id_basis, small.id_basis * ev, atol=1e-4)  # PC x EV, um -> mm
    assert torch.allclose(model.mean_albedo, small.mean_albedo, atol=1e-5)
    tex_ev = torch.linspace(3.0, 1.0, 80)[:, None, None]
    assert torch.allclose(model.albedo_basis, small.albedo_basis * tex_ev, atol=1e-5)
    assert torch.equal(model.triangles, small.triangles) and (model.exp_basis == 0).all()


@pytest.mark.parametrize("change, message", [
    ({"shapeEV": None}, "shapeEV"),
    ({"tl": np.zeros((3, 3))}, "triangles"),  # 0 in a 1-based file
    ({"texPC": np.zeros((7, 80))}, "texPC"),
])
def test_bfm2009_bad_files_name_the_file(small, tmp_path, change, message):
    path = str(tmp_path / "bad_bfm09.mat")
    scipy.io.savemat(path, bfm2009_arrays(small, **change))
    with pytest.raises(ValueError) as err:
        bfm.load_face_model(f"bfm2009:{path}", landmarks=write_lm(tmp_path, small))
    assert path in str(err.value) and message in str(err.value)


def test_bfm_requires_landmarks(small, tmp_path):
    path = str(tmp_path / "01_MorphableModel.mat")
    scipy.io.savemat(path, bfm2009_arrays(small))
    with pytest.raises(ValueError, match="landmarks=") as err:
        bfm.load_face_model(f"bfm2009:{path}")
    assert path in str(err.value)
    bad = tmp_path / "short.txt"
    bad.write_text("1 2 3")
    with pytest.raises(ValueError, match="short.txt"):
        bfm.load_face_model(f"bfm2009:{path},landmarks={bad}")


def write_bfm2017(path, model, drop=None):
    h5py = pytest.importorskip("h5py")
    V = model.num_vertices
    flat = lambda basis: basis.reshape(basis.shape[0], 3 * V).T.numpy().astype(np.float64)  # (3V, K)
    groups = {"shape": (model.mean_shape, model.id_basis), "expression": (torch.zeros(V, 3), model.exp_basis),
              "color": (model.mean_albedo, model.albedo_basis)}
    with h5py.File(path, "w") as f:
        for group, (mean, basis) in groups.items():
            f[f"{group}/model/mean"] = mean.reshape(-1).numpy().astype(np.float64)
            f[f"{group}/model/pcaBasis"] = flat(basis) / 2.0  # unit-free components
            f[f"{group}/model/pcaVariance"] = np.full(basis.shape[0], 4.0)  # std 2
        f["shape/representer/points"] = model.mean_shape.T.numpy()
        f["shape/representer/cells"] = model.triangles.T.numpy()
        if drop:
            del f[drop]


def test_bfm2017_loads(small, tmp_path):
    path = str(tmp_path / "model2017-1_bfm_nomouth.h5")
    write_bfm2017(path, small)
    model = bfm.load_face_model(f"bfm2017:{path},landmarks={write_lm(tmp_path, small)},recenter=false")
    assert torch.allclose(model.mean_shape, small.mean_shape, atol=1e-5)
    for name in ("id_basis", "exp_basis", "albedo_basis"):  # pcaBasis x sqrt(pcaVariance)
        assert torch.allclose(getattr(model, name), getattr(small, name), atol=1e-5), name
    assert torch.equal(model.triangles, small.triangles)
    assert torch.allclose(model.mean_albedo, small.mean_albedo)


def test_bfm2017_missing_dataset_names_the_file(small, tmp_path):
    path = str(tmp_path / "broken_bfm17.h5")
    write_bfm2017(path, small, drop="shape/model/pcaVariance")
    with pytest.raises(ValueError) as err:
        bfm.load_face_model(f"bfm2017:{path}", landmarks=small.landmarks.tolist())
    assert path in str(err.value) and "shape/model/pcaVariance" in str(err.value)


def test_bfm2017_without_h5py_says_what_to_install(small, tmp_path, monkeypatch):
    path = tmp_path / "model2017-1_bfm_nomouth.h5"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match="pip install h5py"):
        bfm.load_face_model(f"bfm2017:{path}", landmarks=small.landmarks.numpy())


# ----------------------------------------------------------------------------- ICT loader

def write_obj(path, vertices, polygons):
    """An OBJ like ICT-FaceKit's: "v" lines and 1-based "f v/vt/vn ..." polygons."""
    with open(path, "w") as f:
        np.savetxt(f, vertices, fmt="v %.6f %.6f %.6f")
        f.writelines("f " + " ".join(f"{k + 1}/{k + 1}/{k + 1}" for k in poly) + "\n" for poly in polygons)


def test_ict_directory_loads(tmp_path):
    # an 83 x 83 vertex grid (cm); its first polygons use only the first vertices, like ICT's
    # narrow face region (6,706 vertices, 6,560 polygons): quads, then triangle pairs
    n = 83
    u, v = np.meshgrid(np.linspace(-7, 7, n), np.linspace(-10, 8, n))
    neutral = np.stack([u, v, 8 * np.exp(-(u ** 2 + v ** 2) / 60)], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    a = (i * n + j).reshape(-1)
    quads = np.stack([a, a + 1, a + n + 1, a + n], 1)  # counter-clockwise seen from +z
    split = 20 * (n - 1)  # cells in the first 20 rows stay quads
    polygons = [list(q) for q in quads[:split]] + [t for q in quads[split:].tolist()
                                                   for t in ([q[0], q[1], q[2]], [q[0], q[2], q[3]])]
    folder = tmp_path / "ICT-FaceKit" / "FaceXModel"
    folder.mkdir(parents=True)
    write_obj(folder / "generic_neutral_mesh.obj", neutral, polygons)
    g = np.random.default_rng(0)
    shapes = {f"identity00{k}": neutral + 0.1 * g.standard_normal(neutral.shape) for k in range(2)}
    for name in ("jawOpen", "eyeBlink_L"):
        shapes[name] = neutral + 0.2 * g.standard_normal(neutral.shape)
    for name, shape in shapes.items():
        write_obj(folder / f"{name}.obj", shape, polygons)
    (folder / "vertex_indices.json").write_text(json.dumps({"expressions": ["jawOpen", "eyeBlink_L"]}))

    model = bfm.load_face_model(f"ict:{tmp_path / 'ICT-FaceKit'}", recenter=False)
    V = 6706
    assert (model.num_vertices, model.num_faces) == (V, 2 * split + (6560 - split))
    to_t = lambda a: torch.as_tensor(a[:V], dtype=torch.float32)
    assert torch.allclose(model.mean_shape, 10 * to_t(neutral), atol=1e-4)  # cm -> mm
    assert torch.allclose(model.id_basis[1], 10 * (to_t(shapes["identity001"]) - to_t(neutral)), atol=1e-3)
    assert (model.id_basis[2:] == 0).all()
    jaw = 10 * bfm.BLENDSHAPE_STD * (to_t(shapes["jawOpen"]) - to_t(neutral))
    assert torch.allclose(model.exp_basis[0], jaw, atol=1e-3) and model.exp_names == ("jawOpen", "eyeBlink_L")
    assert torch.equal(model.landmarks, torch.tensor(bfm.ICT_LANDMARKS68))
    a, b, c = model.mean_shape[model.triangles].unbind(1)
    assert (torch.cross(b - a, c - a, dim=-1)[:, 2] > 0).all()  # quads split counter-clockwise
    with pytest.raises(FileNotFoundError, match="ICT-FaceKit"):
        bfm.load_face_model(f"ict:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="region"):
        bfm.load_face_model(f"ict:{tmp_path / 'ICT-FaceKit'}", region="wide")


# ----------------------------------------------------------------------------- OBJ export

def test_save_obj_round_trip(small, tmp_path):
    path = str(tmp_path / "mean.obj")
    bfm.save_obj(path, small.mean_shape, small.triangles, small.mean_albedo)
    verts, tris, colors = bfm.read_obj(path)
    assert np.allclose(verts, small.mean_shape.numpy(), atol=1e-5)
    assert np.array_equal(tris, small.triangles.numpy())
    assert np.allclose(colors, small.mean_albedo.numpy(), atol=1e-5)
    lines = open(path).read().splitlines()
    faces = np.array([line.split()[1:] for line in lines if line.startswith("f ")], dtype=int)
    assert faces.min() == 1 and faces.max() == small.num_vertices  # 1-based
    bfm.save_obj(path, small.mean_shape.numpy(), small.triangles.numpy())  # arrays, no colours
    assert bfm.read_obj(path)[2] is None


@given(V=st.integers(3, 30), F=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_save_obj_round_trip_random_meshes(tmp_path_factory, V, F, seed):
    g = np.random.default_rng(seed)
    verts = g.uniform(-100, 100, (V, 3))
    tris = g.integers(0, V, (F, 3))
    colors = g.uniform(0, 1, (V, 3))
    path = str(tmp_path_factory.mktemp("obj") / "mesh.obj")
    bfm.save_obj(path, torch.tensor(verts), torch.tensor(tris), colors)
    v, t, c = bfm.read_obj(path)
    assert np.allclose(v, verts, atol=1e-5) and np.array_equal(t, tris) and np.allclose(c, colors, atol=1e-5)


def test_read_obj_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.obj"):
        bfm.read_obj(str(tmp_path / "absent.obj"))
    empty = tmp_path / "empty.obj"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.obj"):
        bfm.read_obj(str(empty))


def test_save_obj_rejects_bad_shapes(small, tmp_path):
    path = str(tmp_path / "bad.obj")
    with pytest.raises(ValueError, match="vertices"):
        bfm.save_obj(path, small.mean_shape[:, :2], small.triangles)
    with pytest.raises(ValueError, match="triangles"):
        bfm.save_obj(path, small.mean_shape, small.triangles + small.num_vertices)
    with pytest.raises(ValueError, match="triangles"):
        bfm.save_obj(path, small.mean_shape, small.triangles[:, :2])
    with pytest.raises(ValueError, match="colors"):
        bfm.save_obj(path, small.mean_shape, small.triangles, small.mean_albedo[:-1])


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
    _, u = bfm._eig_desc(k)
    assert u[0, 0] > 0 and u[3, 0] < 0  # the first of the tied entries is the positive one
