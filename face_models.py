"""Face models from files, and `load_face_model(spec)`: the one way the project gets a model.

Every model is a `bfm.MorphableModel` (Sec. 3.1; the paper uses the Basel Face Model 2017,
Sec. 4.1) at the theta-layout sizes of `bfm.py`; this module turns a spec string into one.

Specs (`load_face_model(spec)`; keyword options may follow the spec as ",key=value"):
- "toy" (default; e.g. "toy,resolution=188"): built in code by `toy_face.toy_face_model`.
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
required. To make one: write the mean face with `bfm.save_obj` (or `python face_models.py
SPEC --obj PATH`), open it in a mesh viewer that shows vertex indices (e.g. MeshLab's "Get
Info" picking), pick the 68 points in iBUG order and write them one per line. Loaders make the
triangles counter-clockwise seen from the front (all are flipped when the area-weighted normal
points to -z) and, with `recenter=True` (default), translate the mean so that the origin is
`bfm.NOSE_TIP_DEPTH` straight behind the nose tip (landmark 30, `bfm.center_behind_nose`).
Models without albedo get `toy_face.make_albedo` on their own mesh.

Deviations from the paper: the paper uses BFM 2017, which cannot be shipped; the default is
the toy model, and real models load from user files (`load_bfm2017` reads BFM 2017 itself).

Run `python face_models.py` to build the toy model and print its summary (`--obj PATH` writes
the mean face with its albedo, `--demo PATH` a grid of random faces rendered with their 68
landmarks); `python -m pytest -q tests/test_face_models.py` tests this module.
"""
import argparse
import json
import os
import re
import time
import zipfile
from typing import Optional

import numpy as np
import torch

from bfm import (THETA_SIZES, MorphableModel, center_behind_nose, check_array, check_ids,
                 save_obj, to_float32, to_numpy)
from toy_face import make_albedo, toy_face_model

BLENDSHAPE_STD = 0.5  # std of a blendshape activation, N(0, s^2), for non-PCA expressions

# ICT-FaceKit README, "Multi-PIE 68 point facial landmarks indices" (0-based)
ICT_LANDMARKS68 = (
    1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272,
    4088, 3443, 268, 493, 1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942,
    4857, 1140, 2075, 1147, 4269, 3360, 1507, 1542, 1537, 1528, 1518, 1511, 3742, 3751, 3756,
    3721, 3725, 3732, 5708, 5695, 2081, 0, 4275, 6200, 6213, 6346, 6461, 5518, 5957, 5841,
    5702, 5711, 5533, 6216, 6207, 6470, 5517, 5966)
# ICT-FaceKit README, "Face Area Details": (vertices, polygons) at the start of its mesh
ICT_REGIONS = {"narrow": (6706, 6560), "full": (9409, 9230)}


# ----------------------------------------------------------------------------- assembling a model

def fit_modes(basis, num_modes: int, num_vertices: int) -> torch.Tensor:
    """Keep the leading `num_modes` modes of a (K, V, 3) basis, or pad it with zero modes;
    None gives all-zero modes. Returns (num_modes, V, 3) float32."""
    if basis is None:
        return torch.zeros(num_modes, num_vertices, 3)
    basis = to_float32(to_numpy(basis)[:num_modes])
    pad = torch.zeros(num_modes - basis.shape[0], num_vertices, 3)
    return torch.cat([basis, pad], dim=0)  # (num_modes, V, 3)


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
        ids = to_numpy(landmarks)
    if ids.shape != (68,) or ids.dtype.kind not in "iu":
        raise ValueError(f"{source}expected 68 integer landmark vertex ids, got shape "
                         f"{ids.shape}, dtype {ids.dtype}")
    return ids.astype(np.int64)


def _orient_front(mean_shape: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Flip every triangle when the area-weighted normal of the mesh points to -z."""
    a, b, c = (mean_shape[triangles[:, k]] for k in range(3))
    normal_z = np.cross(b - a, c - a)[:, 2].sum()
    return triangles[:, ::-1].copy() if normal_z < 0 else triangles


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
    V = check_array(mean_shape, (None, 3), "mean_shape", src)[0]
    check_array(id_basis, (None, V, 3), "id_basis", src)
    for name, basis in (("exp_basis", exp_basis), ("albedo_basis", albedo_basis)):
        if basis is not None:
            check_array(basis, (None, V, 3), name, src)
    if mean_albedo is not None:
        check_array(mean_albedo, (V, 3), "mean_albedo", src)
    check_ids(triangles, (None, 3), V, "triangles", src)
    check_ids(landmarks, (68,), V, "landmarks", src)
    mean_shape = to_numpy(mean_shape).astype(np.float64)
    landmarks = to_numpy(landmarks).astype(np.int64)
    triangles = _orient_front(mean_shape, to_numpy(triangles).astype(np.int64))
    if recenter:
        mean_shape = center_behind_nose(mean_shape, landmarks)
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


# ----------------------------------------------------------------------------- loaders

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
            f"landmarks=FILE with 68 0-based vertex ids in iBUG order (see face_models.py's docstring "
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


# ----------------------------------------------------------------------------- specs

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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build or load a face model and summarize it.")
    parser.add_argument("spec", nargs="?", default="toy", help="face model spec (module docs)")
    parser.add_argument("--obj", help="write the mean face with its mean albedo to this OBJ file")
    parser.add_argument("--demo", help="write a grid of random faces of the model (pose, "
                        "expression, light), rendered with their 68 landmarks, to this PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --demo faces")
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
    if args.demo:
        import figures  # figures sits above the face models; only this command draws

        os.makedirs(os.path.dirname(args.demo) or ".", exist_ok=True)
        figures.save_png(figures.renderer_demo(model, seed=args.seed), args.demo)
        print(f"wrote {args.demo}")


if __name__ == "__main__":
    main()
