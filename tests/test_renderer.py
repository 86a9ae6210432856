"""Tests of renderer.py: a slow per-pixel reference rasterizer, hand-drawn scenes, float64
gradchecks, SH orthonormality, camera geometry, and the full render on the toy face."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import renderer
import toy_face
from renderer import (barycentrics, camera_transform, euler_rotation, interpolate, project,
                      rasterize, render, sh_basis, shade, vertex_normals)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- reference

def reference_rasterize(verts_pix, triangles, height, width):
    """Slow, obviously correct twin of `rasterize`: every pixel centre against every
    triangle, in Python floats, nearest float32 depth wins, ties to the lower face id."""
    verts = verts_pix.detach().double().tolist()
    tris = triangles.tolist()
    B = len(verts)
    out = np.full((B, height, width), -1, dtype=np.int64)
    for b in range(B):
        best = {}
        for f, (i, j, k) in enumerate(tris):
            (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = verts[b][i], verts[b][j], verts[b][k]
            area = -((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0))
            if min(z0, z1, z2) <= renderer.NEAR or area <= 1e-9:
                continue
            for py in range(height):
                for px in range(width):
                    w0 = -((x2 - x1) * (py - y1) - (y2 - y1) * (px - x1))
                    w1 = -((x0 - x2) * (py - y2) - (y0 - y2) * (px - x2))
                    w2 = -((x1 - x0) * (py - y0) - (y1 - y0) * (px - x0))
                    if w0 < 0 or w1 < 0 or w2 < 0:
                        continue
                    depth = np.float32((w0 + w1 + w2) / (w0 / z0 + w1 / z1 + w2 / z2))
                    key = (depth, f)
                    if (py, px) not in best or key < best[(py, px)]:
                        best[(py, px)] = key
        for (py, px), (_, f) in best.items():
            out[b, py, px] = f
    return torch.from_numpy(out)


@st.composite
def random_scenes(draw):
    """Random triangle soups in pixel space: some off-screen, some behind the camera,
    both windings, small images of any aspect."""
    B = draw(st.integers(1, 2))
    H = draw(st.integers(3, 12))
    W = draw(st.integers(3, 12))
    V = draw(st.integers(3, 12))
    F = draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, V, 2, generator=g, dtype=torch.float64) * torch.tensor([W + 4.0, H + 4.0]) - 2
    z = torch.rand(B, V, 1, generator=g, dtype=torch.float64) * 20 - 2  # some behind camera
    triangles = torch.randint(0, V, (F, 3), generator=g)
    return torch.cat([xy, z], -1), triangles, H, W


@given(random_scenes())
def test_rasterize_matches_reference(scene):
    verts_pix, triangles, H, W = scene
    expected = reference_rasterize(verts_pix, triangles, H, W)
    assert torch.equal(rasterize(verts_pix, triangles, H, W), expected)
    # the chunked path is the same computation in pieces
    assert torch.equal(rasterize(verts_pix, triangles, H, W, chunk_size=7), expected)


def test_rasterize_matches_reference_on_a_dense_mesh():
    """A grid mesh (shared edges, pixel centres exactly on edges) under perspective."""
    g = torch.Generator().manual_seed(0)
    n = 6
    u, v = torch.meshgrid(torch.linspace(0, 11, n), torch.linspace(0, 9, n), indexing="xy")
    z = 50 + 5 * torch.rand(n, n, generator=g)
    verts = torch.stack([u, v, z], -1).reshape(1, -1, 3).double()
    idx = torch.arange(n * n).view(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    # counter-clockwise in a y-up frame = clockwise on the y-down screen
    triangles = torch.cat([torch.stack([a, c, b], -1).reshape(-1, 3),
                           torch.stack([b, c, d], -1).reshape(-1, 3)])
    face_id = rasterize(verts, triangles, 10, 12)
    assert torch.equal(face_id, reference_rasterize(verts, triangles, 10, 12))
    assert (face_id[0, :10, :12] >= 0).all()  # the grid covers every pixel centre, no cracks


# ----------------------------------------------------------------------------- tiny scenes

def test_one_triangle_on_an_8x8_grid():
    # corners (1,1), (1,6), (6,1) in pixels: counter-clockwise seen from the front (y up)
    verts = torch.tensor([[[1.0, 1.0, 10.0], [1.0, 6.0, 10.0], [6.0, 1.0, 10.0]]])
    expected = torch.tensor([
        [-1, -1, -1, -1, -1, -1, -1, -1],
        [-1, +0, +0, +0, +0, +0, +0, -1],
        [-1, +0, +0, +0, +0, +0, -1, -1],
        [-1, +0, +0, +0, +0, -1, -1, -1],
        [-1, +0, +0, +0, -1, -1, -1, -1],
        [-1, +0, +0, -1, -1, -1, -1, -1],
        [-1, +0, -1, -1, -1, -1, -1, -1],
        [-1, -1, -1, -1, -1, -1, -1, -1]])
    assert torch.equal(rasterize(verts, torch.tensor([[0, 1, 2]]), 8, 8)[0], expected)
    # the same triangle wound the other way is a back face: culled
    assert (rasterize(verts, torch.tensor([[0, 2, 1]]), 8, 8) == -1).all()


def test_two_overlapping_triangles_nearer_wins():
    # face 0: a far triangle over the left half; face 1: a near one over the top rows
    verts = torch.tensor([[[0.0, 0.0, 20.0], [0.0, 7.0, 20.0], [4.0, 0.0, 20.0],
                           [0.0, 0.0, 10.0], [0.0, 2.0, 10.0], [7.0, 0.0, 10.0]]])
    triangles = torch.tensor([[0, 1, 2], [3, 4, 5]])
    face_id = rasterize(verts, triangles, 8, 8)[0]
    assert face_id[0, 0] == 1 and face_id[1, 0] == 1 and face_id[0, 6] == 1
    assert face_id[3, 0] == 0 and face_id[6, 0] == 0
    # swapping depths swaps the winner where they overlap
    verts[0, 3:, 2] = 30.0
    face_id = rasterize(verts, triangles, 8, 8)[0]
    assert face_id[0, 0] == 0 and face_id[1, 0] == 0 and face_id[0, 6] == 1


def test_triangle_behind_camera_gives_empty_image():
    verts = torch.tensor([[[1.0, 1.0, -10.0], [1.0, 6.0, -10.0], [6.0, 1.0, -10.0]]])
    assert (rasterize(verts, torch.tensor([[0, 1, 2]]), 8, 8) == -1).all()
    verts[0, 0, 2] = 10.0  # one vertex in front is not enough
    assert (rasterize(verts, torch.tensor([[0, 1, 2]]), 8, 8) == -1).all()


def test_rasterize_rejects_bad_input():
    verts = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="verts_pix"):
        rasterize(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), 8, 8)
    with pytest.raises(ValueError, match="triangle"):
        rasterize(verts, torch.tensor([[0, 1, 3]]), 8, 8)
    with pytest.raises(ValueError, match="triangles"):
        rasterize(verts, torch.tensor([[0.0, 1.0, 2.0]]), 8, 8)
    with pytest.raises(ValueError, match="positive"):
        rasterize(verts, torch.tensor([[0, 1, 2]]), 0, 8)


# ----------------------------------------------------------------------------- camera

@given(st.lists(st.floats(-math.pi, math.pi), min_size=3, max_size=3))
def test_rotations_are_orthonormal_with_det_one(angles):
    R = euler_rotation(torch.tensor([angles], dtype=torch.float64))[0]
    assert torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.det(R).item() == pytest.approx(1.0, abs=1e-12)


def test_euler_angles_follow_the_documented_axes():
    half_pi = math.pi / 2
    # yaw +90 deg turns the face's +z (towards the viewer) to +x (viewer's right)
    R = euler_rotation(torch.tensor([[0.0, half_pi, 0.0]], dtype=torch.float64))[0]
    assert torch.allclose(R @ torch.tensor([0.0, 0, 1], dtype=torch.float64),
                          torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-12)
    # R = Rz Ry Rx: pitch acts first
    a = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    Rx = euler_rotation(a * torch.tensor([1.0, 0, 0], dtype=torch.float64))
    Ry = euler_rotation(a * torch.tensor([0.0, 1, 0], dtype=torch.float64))
    Rz = euler_rotation(a * torch.tensor([0.0, 0, 1], dtype=torch.float64))
    assert torch.allclose(euler_rotation(a), Rz @ Ry @ Rx, atol=1e-12)


def test_projection_of_known_points():
    H, W = 224, 160
    f = renderer.focal_length(H, W)
    assert f == pytest.approx(1014.72 * 160 / 224)
    # the origin projects to the principal point at depth 1000 mm; +y (up) goes up the image
    pts = torch.tensor([[[0.0, 0.0, 0.0], [10.0, 20.0, 0.0]]], dtype=torch.float64)
    pix = project(camera_transform(pts, torch.zeros(1, 6, dtype=torch.float64)), height=H, width=W)
    assert torch.allclose(pix[0, 0], torch.tensor([(W - 1) / 2, (H - 1) / 2, 1000.0], dtype=torch.float64))
    assert pix[0, 1, 0] == pytest.approx((W - 1) / 2 + f * 10 / 1000)
    assert pix[0, 1, 1] == pytest.approx((H - 1) / 2 - f * 20 / 1000)


def test_gradcheck_projection():
    g = torch.Generator().manual_seed(1)
    verts = (torch.randn(2, 5, 3, generator=g, dtype=torch.float64) * 50).requires_grad_()
    pose = (torch.randn(2, 6, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    fn = lambda v, p: project(camera_transform(v, p), height=20, width=30)
    assert torch.autograd.gradcheck(fn, (verts, pose))


# ----------------------------------------------------------------------------- shading

def test_sh_basis_is_orthonormal_on_the_sphere():
    # Gauss-Legendre in cos(theta) x uniform in phi integrates degree <= 4 products exactly
    nodes, w = np.polynomial.legendre.leggauss(8)
    phi = np.arange(16) * 2 * np.pi / 16
    ct, ph = np.meshgrid(nodes, phi, indexing="ij")
    st_ = np.sqrt(1 - ct ** 2)
    n = torch.tensor(np.stack([st_ * np.cos(ph), st_ * np.sin(ph), ct], -1))  # (8, 16, 3)
    weights = torch.tensor(np.repeat(w[:, None], 16, 1) * (2 * np.pi / 16))  # (8, 16)
    Y = sh_basis(n)  # (8, 16, 9)
    gram = torch.einsum("ab,abi,abj->ij", weights, Y, Y)
    assert torch.allclose(gram, torch.eye(9, dtype=torch.float64), atol=1e-5)


def test_zero_light_is_ambient_and_gradcheck_shading():
    g = torch.Generator().manual_seed(2)
    albedo = torch.rand(2, 6, 3, generator=g, dtype=torch.float64)
    normals = torch.nn.functional.normalize(torch.randn(2, 6, 3, generator=g, dtype=torch.float64), dim=-1)
    ambient = shade(albedo, normals, torch.zeros(2, 27, dtype=torch.float64))
    assert torch.allclose(ambient, albedo * renderer.SH_AMBIENT * 0.282095)
    verts = torch.randn(2, 6, 3, generator=g, dtype=torch.float64).requires_grad_()
    tris = torch.tensor([[0, 1, 2], [1, 3, 2], [3, 4, 5], [0, 2, 5]])
    sh = (0.1 * torch.randn(2, 27, generator=g, dtype=torch.float64)).requires_grad_()
    albedo.requires_grad_()
    fn = lambda v, a, s: shade(a, vertex_normals(v, tris), s)
    assert torch.autograd.gradcheck(fn, (verts, albedo, sh))


def test_vertex_normals_of_a_plane_and_a_tetrahedron():
    # a flat counter-clockwise square in the z = 0 plane: normals +z
    square = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]])
    n = vertex_normals(square, torch.tensor([[0, 1, 2], [0, 2, 3]]))
    assert torch.allclose(n, torch.tensor([0.0, 0, 1]).expand(1, 4, 3))
    # a closed tetrahedron around the origin: each vertex normal points away from it
    tet = torch.tensor([[[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]])
    tris = torch.tensor([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    n = vertex_normals(tet, tris)
    assert torch.allclose(n, tet / math.sqrt(3), atol=1e-6)


# ----------------------------------------------------------------------------- interpolation

def interior_scene(dtype=torch.float64):
    """Two triangles well inside a 12 x 14 image, pixel centres away from edges."""
    verts = torch.tensor([[[1.3, 1.2, 40.0], [1.4, 10.7, 45.0], [12.6, 1.1, 50.0], [12.7, 10.6, 42.0]]],
                         dtype=dtype)
    return verts, torch.tensor([[0, 1, 2], [2, 1, 3]])


def test_barycentrics_interpolate_corners_and_sum_to_one():
    verts, tris = interior_scene()
    face_id = rasterize(verts, tris, 12, 14)
    frags = barycentrics(verts, tris, face_id)
    assert frags.pixels.numel() == int((face_id >= 0).sum())
    assert torch.allclose(frags.weights.sum(-1), torch.ones(len(frags.pixels), dtype=torch.float64))
    assert (frags.weights >= -1e-12).all()
    # interpolating the camera-space position, then projecting, gives back the pixel centre:
    # this holds only with perspective-correct weights
    f = 100.0
    cam = torch.cat([(verts[..., :2] - 6) * verts[..., 2:] / f, verts[..., 2:]], -1)  # back-project
    pos = interpolate(cam, frags, height=12, width=14)  # (1, 3, 12, 14)
    covered = face_id[0] >= 0
    ys, xs = covered.nonzero().unbind(1)
    px = pos[0, 0][covered] / pos[0, 2][covered] * f + 6
    py = pos[0, 1][covered] / pos[0, 2][covered] * f + 6
    assert torch.allclose(px, xs.double(), atol=1e-9) and torch.allclose(py, ys.double(), atol=1e-9)
    assert (pos[:, :, ~covered] == 0).all()


def test_gradcheck_barycentrics_and_interpolation():
    verts, tris = interior_scene()
    face_id = rasterize(verts, tris, 12, 14)
    attrs = torch.rand(1, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fn = lambda v, a: interpolate(a, barycentrics(v, tris, face_id), height=12, width=14)
    assert torch.autograd.gradcheck(fn, (verts.requires_grad_(), attrs.requires_grad_()))


# ----------------------------------------------------------------------------- render

@pytest.fixture(scope="module")
def toy():
    return toy_face.toy_face_model()


def render_toy(model, theta_sh, pose, *, height=64, width=64, dtype=torch.float32):
    B = pose.shape[0]
    verts = model.mean_shape.to(dtype).expand(B, -1, -1)
    albedo = model.mean_albedo.to(dtype).expand(B, -1, -1)
    return render(verts, albedo, theta_sh.to(dtype), pose.to(dtype), model.triangles,
                  model.landmarks, height=height, width=width)


def test_render_mean_face_frontal(toy):
    out = render_toy(toy, torch.zeros(1, 27), torch.zeros(1, 6), height=96, width=80)
    assert out.image.shape == (1, 3, 96, 80) and out.region.shape == (1, 1, 96, 80)
    assert out.face_id.shape == (1, 96, 80) and out.landmarks.shape == (1, 68, 2)
    assert (out.image * (1 - out.region) == 0).all()
    frac = out.region.mean().item()
    assert 0.2 < frac < 0.9, f"face covers {frac:.2f} of the image"
    # every landmark lies inside the image and on the rendered face
    lm = out.landmarks[0].round().long()
    assert (lm[:, 0] >= 0).all() and (lm[:, 0] < 80).all() and (lm[:, 1] >= 0).all() and (lm[:, 1] < 96).all()
    assert out.region[0, 0, lm[:, 1], lm[:, 0]].mean() > 0.9
    # normals of the frontal face: unit length, and facing the camera where visible
    normals = vertex_normals(toy.mean_shape[None], toy.triangles)
    assert torch.allclose(normals.norm(dim=-1), torch.ones(1, toy.mean_shape.shape[0]), atol=1e-5)
    visible = toy.triangles[out.face_id[out.face_id >= 0].unique()].unique()
    assert (normals[0, visible, 2] > 0).float().mean() > 0.97


def test_render_gradients_reach_every_input(toy):
    B = 2
    verts = toy.mean_shape.expand(B, -1, -1).clone().requires_grad_()
    albedo = toy.mean_albedo.expand(B, -1, -1).clone().requires_grad_()
    sh = torch.zeros(B, 27, requires_grad=True)
    pose = torch.tensor([[0.1, 0.2, 0.0, 0, 0, 0], [0.0, -0.3, 0.1, 5, 0, 0]], requires_grad=True)
    out = render(verts, albedo, sh, pose, toy.triangles, toy.landmarks, height=48, width=48)
    target = torch.rand_like(out.image)
    ((out.image - target) ** 2).sum().backward()
    for name, t in [("verts", verts), ("albedo", albedo), ("sh", sh), ("pose", pose)]:
        assert t.grad is not None and t.grad.abs().sum() > 0, name
        assert torch.isfinite(t.grad).all(), name


def test_all_culled_sample_gives_zero_image_that_backpropagates(toy):
    sh = torch.zeros(2, 27)
    pose = torch.zeros(2, 6)
    pose[1, 5] = 3000.0  # second face pushed behind the camera
    pose_far = pose.clone()
    pose_far[0, 3] = 1e5  # and an off-screen one
    for p in (pose, pose_far):
        p = p.clone().requires_grad_()
        out = render_toy(toy, sh, p, height=32, width=32)
        assert (out.image[1] == 0).all() and (out.region[1] == 0).all()
        out.image.sum().backward()
        assert torch.isfinite(p.grad).all()


def test_render_is_deterministic_and_dtype_consistent(toy):
    pose = torch.tensor([[0.2, 0.4, -0.1, 3.0, -2.0, 10.0]])
    sh = torch.zeros(1, 27)
    sh[0, 1] = 0.5
    a = render_toy(toy, sh, pose)
    b = render_toy(toy, sh, pose)
    assert torch.equal(a.image, b.image) and torch.equal(a.face_id, b.face_id)
    c = render_toy(toy, sh, pose, dtype=torch.float64)
    assert c.image.dtype == torch.float64
    same = (a.face_id == c.face_id).float().mean()
    assert same > 0.995
    both = (a.face_id == c.face_id)[:, None].expand_as(a.image)
    assert torch.allclose(a.image[both].double(), c.image[both], atol=1e-4)


def test_saturated_render_is_the_clamped_render(toy):
    """A very bright light overexposes the face: the camera clips to [0, 1] (saturate=True,
    the default) where the plain shading (saturate=False) goes above 1."""
    sh = torch.zeros(2, 27)
    sh[:, [0, 9, 18]] = 6.0  # phi_0 of every channel: ambient far above the default
    sh[1, [3, 12, 21]] = -12.0  # and a negative light from +x on the second face: black parts
    pose = torch.tensor([[0.0, 0.3, 0.0, 0, 0, 0], [0.1, -0.4, 0.1, 2, 0, 0]])
    B = pose.shape[0]
    verts = toy.mean_shape.expand(B, -1, -1)
    albedo = toy.mean_albedo.expand(B, -1, -1)
    args = (verts, albedo, sh, pose, toy.triangles, toy.landmarks)
    raw = render(*args, height=48, width=48, saturate=False)
    saturated = render(*args, height=48, width=48)
    assert raw.image.max() > 1.5 and raw.image.min() < 0  # the test light does overexpose
    assert saturated.image.min() >= 0 and saturated.image.max() <= 1
    assert torch.equal(saturated.image, raw.image.clamp(0, 1))
    assert torch.equal(saturated.region, raw.region) and torch.equal(saturated.face_id, raw.face_id)
    assert torch.equal(saturated.landmarks, raw.landmarks)
    # clipped pixels pass no gradient; the others pass the unclipped gradient
    sh_grad = sh.clone().requires_grad_()
    image = render(verts, albedo, sh_grad, pose, toy.triangles, toy.landmarks, height=48,
                   width=48).image
    (grad,) = torch.autograd.grad(image.sum(), sh_grad)
    inside = ((raw.image > 0) & (raw.image < 1)).float()
    sh_raw = sh.clone().requires_grad_()
    image = render(verts, albedo, sh_raw, pose, toy.triangles, toy.landmarks, height=48,
                   width=48, saturate=False).image
    (expected,) = torch.autograd.grad((image * inside).sum(), sh_raw)
    assert torch.allclose(grad, expected, atol=1e-4)
    # with the default light the face is not overexposed: both agree where nothing clips
    dim = render(verts, albedo, torch.zeros(B, 27), pose, toy.triangles, toy.landmarks,
                 height=48, width=48, saturate=False).image
    ok = (dim >= 0) & (dim <= 1)
    assert torch.equal(render(verts, albedo, torch.zeros(B, 27), pose, toy.triangles,
                              toy.landmarks, height=48, width=48).image[ok], dim[ok])

def test_render_rejects_bad_input(toy):
    verts = toy.mean_shape[None]
    with pytest.raises(ValueError, match="albedo"):
        render(verts, verts[:, :10], torch.zeros(1, 27), torch.zeros(1, 6), toy.triangles,
               toy.landmarks, height=16, width=16)
    with pytest.raises(ValueError, match="pose"):
        render(verts, toy.mean_albedo[None], torch.zeros(1, 27), torch.zeros(1, 5),
               toy.triangles, toy.landmarks, height=16, width=16)
    with pytest.raises(ValueError, match="sh"):
        render(verts, toy.mean_albedo[None], torch.zeros(1, 9), torch.zeros(1, 6),
               toy.triangles, toy.landmarks, height=16, width=16)


@pytest.mark.cuda
@CUDA
def test_cuda_matches_cpu(toy):
    pose = torch.tensor([[0.1, 0.5, 0.0, 0, 0, 0], [0.0, -0.2, 0.2, 5, 5, 20]])
    sh = torch.randn(2, 27, generator=torch.Generator().manual_seed(0)) * 0.2
    cpu = render_toy(toy, sh, pose, height=128, width=96)
    gpu_model = copy.deepcopy(toy).to("cuda")  # Module.to moves in place: keep the fixture
    gpu = render(gpu_model.mean_shape.expand(2, -1, -1), gpu_model.mean_albedo.expand(2, -1, -1),
                 sh.cuda(), pose.cuda(), gpu_model.triangles, gpu_model.landmarks,
                 height=128, width=96)
    agree = (gpu.face_id.cpu() == cpu.face_id).float().mean()
    assert agree > 0.999
    both = (gpu.face_id.cpu() == cpu.face_id)[:, None].expand_as(cpu.image)
    assert torch.allclose(gpu.image.cpu()[both], cpu.image[both], atol=1e-4)


def test_renderer_imports_nothing_of_ours():
    """The renderer takes tensors: it imports no module of this repository."""
    import ast
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(renderer.__file__)))
    ours = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "*.py"))}
    tree = ast.parse(open(renderer.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & (ours - {"renderer"}), imported & ours
