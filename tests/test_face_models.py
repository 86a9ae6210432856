"""Tests for face_models.py: specs, the npz / BFM 2009 / BFM 2017 / ICT-FaceKit loaders, OBJ
export and import, and the command line (summary, OBJ, renderer demo sheet)."""
import json
import os
import sys

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, strategies as st

import bfm
import face_models
import toy_face

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ICT_NPZ = os.path.join(ROOT, "..", "shared", "face_models", "ict_facekit_narrow.npz")


@pytest.fixture(scope="module")
def small():
    """A coarse toy model, the source of the synthetic files the loader tests write."""
    return toy_face.toy_face_model(20)


# ----------------------------------------------------------------------------- assembling a model

def test_fit_modes_keeps_leading_or_pads():
    basis = torch.randn(5, 7, 3)
    assert torch.equal(face_models.fit_modes(basis, 3, 7), basis[:3])
    padded = face_models.fit_modes(basis.numpy(), 8, 7)
    assert padded.shape == (8, 7, 3) and torch.equal(padded[:5], basis) and (padded[5:] == 0).all()
    assert (face_models.fit_modes(None, 4, 7) == 0).all()


# ----------------------------------------------------------------------------- specs

def test_load_face_model_specs(small):
    model = face_models.load_face_model("toy,resolution=20")
    assert model.name == "toy:20" and torch.equal(model.mean_shape, small.mean_shape)
    with pytest.raises(ValueError, match="unknown face model spec"):
        face_models.load_face_model("bfm2019:x.h5")
    with pytest.raises(ValueError, match="unknown face model spec"):
        face_models.load_face_model("npz:")
    with pytest.raises(ValueError, match="both"):
        face_models.load_face_model("toy,resolution=20", resolution=30)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        face_models.load_face_model("npz:/nonexistent/missing.npz")


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
    model = face_models.load_face_model(f"npz:{path}", recenter=False)
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
    model = face_models.load_face_model(f"npz:{path}")  # recenter=True by default
    lm = model.mean_shape[model.landmarks]
    assert abs(lm[30, 2] - bfm.NOSE_TIP_DEPTH) < 1e-3
    assert lm[30, :2].abs().max() < 1e-3
    assert model.exp_names == tuple(names)
    # named expressions are blendshapes: one std = BLENDSHAPE_STD x the full offset
    assert torch.allclose(model.exp_basis[:10], face_models.BLENDSHAPE_STD * small.exp_basis[:10], atol=1e-2)
    pca = face_models.load_face_model(f"npz:{path}", blendshape_std=1.0)
    assert torch.allclose(pca.exp_basis[:10], small.exp_basis[:10], atol=1e-2)


def test_npz_flips_clockwise_triangles_and_takes_landmark_file(small, tmp_path):
    path = str(tmp_path / "face.npz")
    np.savez(path, **npz_arrays(small, triangles=small.triangles.numpy()[:, ::-1].copy(),
                                landmarks68=None))
    lm_file = tmp_path / "lm68.txt"
    lm_file.write_text("# ids\n" + ", ".join(map(str, small.landmarks.tolist())) + "\n")
    model = face_models.load_face_model(f"npz:{path},landmarks={lm_file}")
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
        face_models.load_face_model(f"npz:{path}")
    assert path in str(err.value) and message in str(err.value), case


def test_npz_not_a_zip_names_the_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.npz"):
        face_models.load_face_model(f"npz:{path}")


@pytest.mark.skipif(not os.path.isfile(ICT_NPZ), reason="ICT-FaceKit npz not present")
def test_ict_npz_loads():
    model = face_models.load_face_model(f"npz:{ICT_NPZ}")
    assert (model.num_vertices, model.num_faces) == (6706, 13120)
    assert len(model.exp_names) == 53 and model.exp_names[26] == "jawOpen"
    assert (model.exp_basis[53:] == 0).all() and (model.id_basis.abs().amax(dim=(1, 2)) > 0).all()
    lm = model.mean_shape[model.landmarks]
    assert abs(lm[30, 2] - bfm.NOSE_TIP_DEPTH) < 1e-3 and lm[8, 1] == lm[:, 1].min()
    assert torch.equal(model.landmarks, torch.tensor(face_models.ICT_LANDMARKS68))
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
    model = face_models.load_face_model(f"bfm2009:{path}", landmarks=write_lm(tmp_path, small), recenter=False)
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
        face_models.load_face_model(f"bfm2009:{path}", landmarks=write_lm(tmp_path, small))
    assert path in str(err.value) and message in str(err.value)


def test_bfm_requires_landmarks(small, tmp_path):
    path = str(tmp_path / "01_MorphableModel.mat")
    scipy.io.savemat(path, bfm2009_arrays(small))
    with pytest.raises(ValueError, match="landmarks=") as err:
        face_models.load_face_model(f"bfm2009:{path}")
    assert path in str(err.value)
    bad = tmp_path / "short.txt"
    bad.write_text("1 2 3")
    with pytest.raises(ValueError, match="short.txt"):
        face_models.load_face_model(f"bfm2009:{path},landmarks={bad}")


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
    model = face_models.load_face_model(f"bfm2017:{path},landmarks={write_lm(tmp_path, small)},recenter=false")
    assert torch.allclose(model.mean_shape, small.mean_shape, atol=1e-5)
    for name in ("id_basis", "exp_basis", "albedo_basis"):  # pcaBasis x sqrt(pcaVariance)
        assert torch.allclose(getattr(model, name), getattr(small, name), atol=1e-5), name
    assert torch.equal(model.triangles, small.triangles)
    assert torch.allclose(model.mean_albedo, small.mean_albedo)


def test_bfm2017_missing_dataset_names_the_file(small, tmp_path):
    path = str(tmp_path / "broken_bfm17.h5")
    write_bfm2017(path, small, drop="shape/model/pcaVariance")
    with pytest.raises(ValueError) as err:
        face_models.load_face_model(f"bfm2017:{path}", landmarks=small.landmarks.tolist())
    assert path in str(err.value) and "shape/model/pcaVariance" in str(err.value)


def test_bfm2017_without_h5py_says_what_to_install(small, tmp_path, monkeypatch):
    path = tmp_path / "model2017-1_bfm_nomouth.h5"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match="pip install h5py"):
        face_models.load_face_model(f"bfm2017:{path}", landmarks=small.landmarks.numpy())


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

    model = face_models.load_face_model(f"ict:{tmp_path / 'ICT-FaceKit'}", recenter=False)
    V = 6706
    assert (model.num_vertices, model.num_faces) == (V, 2 * split + (6560 - split))
    to_t = lambda a: torch.as_tensor(a[:V], dtype=torch.float32)
    assert torch.allclose(model.mean_shape, 10 * to_t(neutral), atol=1e-4)  # cm -> mm
    assert torch.allclose(model.id_basis[1], 10 * (to_t(shapes["identity001"]) - to_t(neutral)), atol=1e-3)
    assert (model.id_basis[2:] == 0).all()
    jaw = 10 * face_models.BLENDSHAPE_STD * (to_t(shapes["jawOpen"]) - to_t(neutral))
    assert torch.allclose(model.exp_basis[0], jaw, atol=1e-3) and model.exp_names == ("jawOpen", "eyeBlink_L")
    assert torch.equal(model.landmarks, torch.tensor(face_models.ICT_LANDMARKS68))
    a, b, c = model.mean_shape[model.triangles].unbind(1)
    assert (torch.cross(b - a, c - a, dim=-1)[:, 2] > 0).all()  # quads split counter-clockwise
    with pytest.raises(FileNotFoundError, match="ICT-FaceKit"):
        face_models.load_face_model(f"ict:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="region"):
        face_models.load_face_model(f"ict:{tmp_path / 'ICT-FaceKit'}", region="wide")


# ----------------------------------------------------------------------------- OBJ export

def test_save_obj_round_trip(small, tmp_path):
    path = str(tmp_path / "mean.obj")
    bfm.save_obj(path, small.mean_shape, small.triangles, small.mean_albedo)
    verts, tris, colors = face_models.read_obj(path)
    assert np.allclose(verts, small.mean_shape.numpy(), atol=1e-5)
    assert np.array_equal(tris, small.triangles.numpy())
    assert np.allclose(colors, small.mean_albedo.numpy(), atol=1e-5)
    lines = open(path).read().splitlines()
    faces = np.array([line.split()[1:] for line in lines if line.startswith("f ")], dtype=int)
    assert faces.min() == 1 and faces.max() == small.num_vertices  # 1-based
    bfm.save_obj(path, small.mean_shape.numpy(), small.triangles.numpy())  # arrays, no colours
    assert face_models.read_obj(path)[2] is None


@given(V=st.integers(3, 30), F=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_save_obj_round_trip_random_meshes(tmp_path_factory, V, F, seed):
    g = np.random.default_rng(seed)
    verts = g.uniform(-100, 100, (V, 3))
    tris = g.integers(0, V, (F, 3))
    colors = g.uniform(0, 1, (V, 3))
    path = str(tmp_path_factory.mktemp("obj") / "mesh.obj")
    bfm.save_obj(path, torch.tensor(verts), torch.tensor(tris), colors)
    v, t, c = face_models.read_obj(path)
    assert np.allclose(v, verts, atol=1e-5) and np.array_equal(t, tris) and np.allclose(c, colors, atol=1e-5)


def test_read_obj_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.obj"):
        face_models.read_obj(str(tmp_path / "absent.obj"))
    empty = tmp_path / "empty.obj"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.obj"):
        face_models.read_obj(str(empty))


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


# ----------------------------------------------------------------------------- command line

def test_cli_prints_summary_and_writes_obj_and_demo(small, tmp_path, capsys):
    obj, demo = tmp_path / "mean.obj", tmp_path / "demo" / "faces.png"
    face_models.main(["toy,resolution=20", "--obj", str(obj), "--demo", str(demo), "--seed", "1"])
    out = capsys.readouterr().out
    assert f"toy:20: {small.num_vertices} vertices" in out
    assert f"wrote {obj}" in out and f"wrote {demo}" in out
    assert np.allclose(face_models.read_obj(str(obj))[0], small.mean_shape.numpy(), atol=1e-5)
    from PIL import Image
    assert Image.open(demo).size == (4 * 192, 3 * 192)


def test_renderer_demo_draws_faces(small):
    import figures

    sheet = figures.renderer_demo(small, rows=1, cols=2, size=48)
    assert sheet.shape == (3, 48, 96) and sheet.min() >= 0 and sheet.max() <= 1
    assert torch.equal((sheet * 255).round() / 255, sheet)  # whole 8-bit levels
    pixels = sheet.mean(0) * 255  # (48, 96), mean over RGB on 0..255
    # each tile has a lit face in its centre, brighter than its dark background corner
    for k in range(2):
        tile = pixels[:, 48 * k:48 * (k + 1)]
        assert tile[20:28, 20:28].mean() > tile[:4, :4].mean() + 30
