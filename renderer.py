"""A differentiable mesh renderer: camera, rasterizer, barycentrics, spherical-harmonics shading.

This is the decoder of the model-based face autoencoder R (paper Sec. 3.1, Fig. 2): it turns
the face model's vertices and albedo, the 27 illumination numbers phi and the 6 camera numbers
c into the rendered image I_R, the rendered face region (the S_R of Eq. 3, where segmentation
metrics are computed) and the projected 68 landmarks lm_R of Eq. 7.

Like every fast renderer (nvdiffrast, pytorch3d, Deep3D, the official FOCUS code), it splits
into a gradient-free visibility step and a differentiable step:

1. `camera_transform` + `project` (grad): rotate, translate, perspective divide.
2. `rasterize` (no grad): which triangle covers each pixel centre. Every (triangle,
   pixel-in-bounding-box) pair becomes one entry of a flat candidate list, the inside test is
   three edge functions, and visibility is one `scatter_reduce(amin)` over a 64-bit key packing
   the depth bits above the face id (nearest wins, ties go to the lower face id). No Python
   loop over batch, triangles or tiles; candidates are processed in chunks of bounded size.
3. `barycentrics` (grad): perspective-correct barycentric weights of each covered pixel.
4. `interpolate` (grad): any per-vertex attribute (albedo, normals, shaded colour) at pixels.

Gradients reach the vertices through the barycentric weights inside covered pixels only, as in
Deep3D and the official FOCUS code: silhouettes and the region mask carry no gradient.

Conventions (shape letters B batch, V vertices, F faces, N covered pixels, H x W image):
- Model space: millimetres, x right, y up, z towards the viewer. Triangles are
  counter-clockwise seen from the front; back faces are culled.
- pose c = (pitch, yaw, roll, tx, ty, tz): Euler angles in radians about x, y, z, applied as
  R = Rz Ry Rx, then the translation (mm) in model space. The camera sits at z = 1000 mm on
  the model's z axis looking at the origin, so c = 0 shows the face frontal about 1 m away.
- Camera space (OpenCV): x right, y down, z forward. Pixel centres at integer coordinates,
  principal point ((W-1)/2, (H-1)/2), focal length 1014.72 px at 224 x 224 (the official
  code's), scaled with min(H, W) so the face fills the same fraction at every size.
- Images (B, C, H, W), masks (B, 1, H, W); `verts_pix` (B, V, 3) holds pixel x, pixel y and
  camera depth z (mm).
- Lighting: 9 real orthonormal SH functions of the world-space unit normal per RGB channel,
  phi laid out (B, 27) = (B, 3 channels, 9); an ambient offset of 0.7 * 2 pi on each channel's
  phi_0 (the official code's) makes phi = 0 render 1.24 x albedo.

Deviations from the paper: none in substance; the paper does not specify the renderer. The
face is lit in world space (normals rotated with the head), as Deep3D and FOCUS do.

This module imports nothing else of the project: it takes tensors, whatever face model they
come from. `python face_models.py --demo out/renderer_demo.png` renders a grid of random toy
faces with it (`figures.renderer_demo`); `python -m pytest tests/test_renderer.py` tests this
module against a slow per-pixel twin of the rasterizer.
"""
import math
import warnings
from typing import NamedTuple, Optional

import torch

FOCAL_224 = 1014.72  # px at 224 x 224, official FOCUS / Deep3D camera
CAMERA_DISTANCE = 1000.0  # mm from the camera to the model-space origin
NEAR = 1.0  # mm; triangles with a vertex closer than this to the camera are culled
SH_AMBIENT = 0.7 * 2 * math.pi  # offset on phi_0 of each channel (official code)
SH_CONSTANTS = (0.282095, 0.488603, 1.092548, 0.315392, 0.546274)
CHUNK_SIZE = 1 << 22  # candidate (triangle, pixel) pairs per rasterizer chunk
_EMPTY_KEY = torch.iinfo(torch.int64).max  # visibility key of a pixel no triangle covers


class Fragments(NamedTuple):
    """The covered pixels of a batch, as flat lists (N = number of covered pixels)."""
    pixels: torch.Tensor  # (N,) long, flat index b * H * W + y * W + x
    vertex_ids: torch.Tensor  # (N, 3) long, global vertex ids b * V + v
    weights: torch.Tensor  # (N, 3) perspective-correct barycentric weights, sum to 1


class Rendered(NamedTuple):
    image: torch.Tensor  # (B, 3, H, W), zero outside the face
    region: torch.Tensor  # (B, 1, H, W) float in {0, 1}: rendered face region, no gradient
    face_id: torch.Tensor  # (B, H, W) long, -1 = background
    landmarks: torch.Tensor  # (B, 68, 2) pixel coordinates (x right, y down)


# ----------------------------------------------------------------------------- camera

def focal_length(height: int, width: int) -> float:
    """Focal length in pixels for an H x W image (1014.72 at 224 x 224)."""
    return FOCAL_224 * min(height, width) / 224.0


def euler_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices R = Rz(roll) Ry(yaw) Rx(pitch).

    Args:
        angles: (B, 3) pitch, yaw, roll in radians.
    Returns:
        (B, 3, 3) rotation matrices acting on column vectors.
    """
    if angles.dim() != 2 or angles.shape[1] != 3:
        raise ValueError(f"angles must be (B, 3), got {tuple(angles.shape)}")
    cos, sin = torch.cos(angles), torch.sin(angles)  # (B, 3)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
    cx, cy, cz = cos.unbind(1)
    sx, sy, sz = sin.unbind(1)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx  # (B, 3, 3)


def rigid_transform(vertices: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Pose the model: p_world = R p + t, still in the model's axes (y up, z to the camera).

    Args:
        vertices: (B, V, 3) model space, mm.
        pose: (B, 6) pitch, yaw, roll (radians), tx, ty, tz (mm).
    Returns:
        (B, V, 3) posed vertices, mm.
    """
    _check_points(vertices, "vertices")
    if pose.shape != (vertices.shape[0], 6):
        raise ValueError(f"pose must be (B, 6) = ({vertices.shape[0]}, 6), got {tuple(pose.shape)}")
    rotation = euler_rotation(pose[:, :3])  # (B, 3, 3)
    # p_world = R p + t
    return vertices @ rotation.transpose(1, 2) + pose[:, None, 3:]  # (B, V, 3)


def camera_transform(vertices: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Model space to OpenCV camera space: pose, then view from z = CAMERA_DISTANCE.

    Args:
        vertices: (B, V, 3) model space, mm.
        pose: (B, 6) as in `rigid_transform`.
    Returns:
        (B, V, 3) camera-space points (x right, y down, z forward), mm.
    """
    return world_to_camera(rigid_transform(vertices, pose))


def world_to_camera(world: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) posed points (y up, z to the camera) to camera space (y down, z forward)."""
    x, y, z = world.unbind(-1)
    # camera at (0, 0, d) looking down -z: x stays, y flips, depth = d - z
    return torch.stack([x, -y, CAMERA_DISTANCE - z], -1)  # (B, V, 3)


def project(points_cam: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """Perspective projection to pixel coordinates, keeping camera depth.

    Args:
        points_cam: (B, V, 3) camera space, z > 0 in front of the camera.
    Returns:
        (B, V, 3) = pixel x, pixel y, camera depth z. Points with z <= 0 project to garbage
        pixel positions; the rasterizer culls their triangles.
    """
    _check_points(points_cam, "points_cam")
    f = focal_length(height, width)
    x, y, z = points_cam.unbind(-1)
    # avoid dividing by ~0 for points at or behind the camera plane (they are culled anyway)
    z_safe = torch.where(z.abs() < 1e-6, torch.full_like(z, 1e-6), z)
    # u = f x / z + c_x,  v = f y / z + c_y
    u = f * x / z_safe + (width - 1) / 2.0
    v = f * y / z_safe + (height - 1) / 2.0
    return torch.stack([u, v, z], -1)  # (B, V, 3)


# ----------------------------------------------------------------------------- shading

class Adjacency(NamedTuple):
    """Vertex-face incidence of a mesh, precomputed once (`vertex_adjacency`)."""
    vertex_face: torch.Tensor  # (V, F) sparse CSR, 1 where vertex v is a corner of face f
    face_vertex: torch.Tensor  # (F, V) sparse CSR, its transpose


def vertex_adjacency(triangles: torch.Tensor, num_vertices: int) -> Adjacency:
    """The sparse vertex-face incidence matrices used by `vertex_normals`.

    Summing face normals into vertices is a sparse matrix product; with the incidence
    precomputed it is several times faster on CPU than `index_add` (which serializes on
    shared vertices), forward and backward.
    """
    _check_triangles(triangles, num_vertices)
    F = triangles.shape[0]
    corners = triangles.reshape(-1)  # (3F,) vertex of each corner
    faces = torch.arange(F, device=triangles.device).repeat_interleave(3)  # (3F,) its face
    return Adjacency(_incidence(corners, faces, (num_vertices, F)),
                     _incidence(faces, corners, (F, num_vertices)))


def _incidence(rows: torch.Tensor, cols: torch.Tensor, shape) -> torch.Tensor:
    """Sparse CSR matrix with a 1 at each (rows[i], cols[i]) (repeats add up)."""
    order = torch.argsort(rows, stable=True)
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    ones = torch.ones(rows.numel(), device=rows.device)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on first use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols[order], ones, shape)


class _SumAroundVertices(torch.autograd.Function):
    """y = A x for the (V, F) incidence A, with the backward A^T g as a second sparse
    product (autograd's own backward transposes the CSR matrix on every call)."""

    @staticmethod
    def forward(ctx, face_values, adjacency):
        ctx.face_vertex = adjacency.face_vertex
        return adjacency.vertex_face.to(face_values.dtype) @ face_values

    @staticmethod
    def backward(ctx, grad):
        return ctx.face_vertex.to(grad.dtype) @ grad, None


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor, *,
                   adjacency: Optional[Adjacency] = None) -> torch.Tensor:
    """Area-weighted vertex normals (unit length), outward for counter-clockwise triangles.

    Args:
        vertices: (B, V, 3).
        triangles: (F, 3) long.
        adjacency: `vertex_adjacency(triangles, V)`, computed here when not given.
    Returns:
        (B, V, 3) unit normals.
    """
    B, V, _ = _check_points(vertices, "vertices")
    if adjacency is None:
        adjacency = vertex_adjacency(triangles, V)
    F = triangles.shape[0]
    v0, v1, v2 = _gather_corners(vertices, triangles).unbind(2)  # 3 x (B, F, 3)
    # n_f = (v1 - v0) x (v2 - v0), length = twice the triangle area
    face_normals = _cross(v1 - v0, v2 - v0)  # (B, F, 3)
    # n_v = sum of n_f over the faces around v
    summed = _SumAroundVertices.apply(face_normals.permute(1, 0, 2).reshape(F, B * 3), adjacency)
    summed = summed.view(V, B, 3).permute(1, 0, 2)  # (B, V, 3)
    return torch.nn.functional.normalize(summed, dim=-1, eps=1e-12)  # (B, V, 3)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a x b over the last axis (elementwise; several times faster than torch.cross on CPU)."""
    a0, a1, a2 = a.unbind(-1)
    b0, b1, b2 = b.unbind(-1)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], -1)


def _gather_corners(points: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """(B, V, C) per-vertex values -> (B, F, 3, C) at each triangle's corners.

    A flat `index_select` on global vertex ids: its backward is a cheap `index_add`, while
    multi-dimensional advanced indexing is several times slower on CPU.
    """
    B, V, C = points.shape
    ids = triangles.reshape(1, -1) + V * torch.arange(B, device=points.device)[:, None]  # (B, 3F)
    return points.reshape(B * V, C).index_select(0, ids.reshape(-1)).view(B, -1, 3, C)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """The 9 real orthonormal spherical harmonics Y_0..Y_8 of unit vectors.

    Order (l, m): (0,0), (1,-1), (1,0), (1,1), (2,-2), (2,-1), (2,0), (2,1), (2,2).

    Args:
        normals: (..., 3) unit vectors.
    Returns:
        (..., 9).
    """
    c0, c1, c2, c3, c4 = SH_CONSTANTS
    x, y, z = normals.unbind(-1)
    return torch.stack([
        torch.full_like(x, c0),
        c1 * y, c1 * z, c1 * x,
        c2 * x * y, c2 * y * z, c3 * (3 * z * z - 1), c2 * x * z, c4 * (x * x - y * y),
    ], -1)  # (..., 9)


def shade(albedo: torch.Tensor, normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """Lambertian SH shading: colour_c = albedo_c * sum_k phi_ck Y_k(n).

    Args:
        albedo: (B, V, 3).
        normals: (B, V, 3) unit normals in world space.
        sh: (B, 27) phi, 9 coefficients per RGB channel; SH_AMBIENT is added to phi_0.
    Returns:
        (B, V, 3) shaded vertex colours.
    """
    B, V, _ = _check_points(albedo, "albedo")
    if sh.shape != (B, 27):
        raise ValueError(f"sh must be (B, 27) = ({B}, 27), got {tuple(sh.shape)}")
    phi = sh.view(B, 3, 9) + sh.new_tensor([SH_AMBIENT] + [0.0] * 8)  # (B, 3, 9)
    # irradiance_c(v) = sum_k Y_k(n_v) phi_ck
    irradiance = sh_basis(normals) @ phi.transpose(1, 2)  # (B, V, 3)
    return albedo * irradiance  # (B, V, 3)


# ----------------------------------------------------------------------------- rasterizer

def _edge(ax, ay, bx, by, px, py):
    """Edge function of the directed edge a -> b at point p: twice the signed area of
    (a, b, p), positive when p lies counter-clockwise of a -> b in the frame of the numbers."""
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def _screen_weights(x, y, px, py):
    """Unnormalised screen-space barycentrics of pixel p in triangles with corners (x, y).

    The model's counter-clockwise front faces appear clockwise on the y-down screen, where
    `_edge` is negative inside; the sign flip makes the three weights >= 0 inside a front
    face, with a positive sum (twice the pixel area).
    Args:
        x, y: (..., 3) corner pixel x and y. px, py: (...,) pixel centre.
    Returns:
        (..., 3) weights w_i (opposite corner i), un-normalised.
    """
    x0, x1, x2 = x.unbind(-1)
    y0, y1, y2 = y.unbind(-1)
    w0 = -_edge(x1, y1, x2, y2, px, py)
    w1 = -_edge(x2, y2, x0, y0, px, py)
    w2 = -_edge(x0, y0, x1, y1, px, py)
    return torch.stack([w0, w1, w2], -1)


@torch.no_grad()
def rasterize(verts_pix: torch.Tensor, triangles: torch.Tensor, height: int, width: int, *,
              chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Which triangle is visible at each pixel centre (no gradient).

    Three steps: each triangle's box of pixel centres (`_triangle_boxes`), the (triangle,
    pixel) candidates of a run of triangles (`_candidate_pixels`, in chunks), and a depth key
    per candidate (`_candidate_keys`) of which each pixel keeps the smallest.

    Args:
        verts_pix: (B, V, 3) pixel x, pixel y, camera depth z.
        triangles: (F, 3) long, counter-clockwise seen from the front.
        height, width: image size.
        chunk_size: at most this many (triangle, pixel) candidates are held at once.
    Returns:
        (B, H, W) long face index in [0, F), -1 where no front-facing triangle covers the
        pixel centre. Triangles with a vertex nearer than NEAR, back faces and degenerate
        triangles are culled; a pixel centre on a shared edge goes to the nearer triangle,
        then to the lower face id.
    """
    B, V, _ = _check_points(verts_pix, "verts_pix")
    _check_triangles(triangles, V)
    if height <= 0 or width <= 0 or chunk_size <= 0:
        raise ValueError(f"height, width, chunk_size must be positive, got {height}, {width}, {chunk_size}")
    F = triangles.shape[0]
    corners = _gather_corners(verts_pix, triangles).view(B * F, 3, 3)  # (BF, corner, xyz)
    boxes, counts, starts = _triangle_boxes(corners, height, width)  # (BF, 4), (BF,), (BF,)
    # per-triangle rows gathered for each candidate: corners (x, y, z)
    corner_rows = corners.reshape(B * F, 9)  # (BF, 9)
    best = torch.full((B * height * width,), _EMPTY_KEY, dtype=torch.int64, device=verts_pix.device)
    for t0, t1 in _chunks(starts, int(counts.sum()), chunk_size):
        tri, px, py = _candidate_pixels(boxes, counts, starts, t0, t1)  # 3 x (C,)
        b = tri // F
        key = _candidate_keys(corner_rows.index_select(0, tri).view(-1, 3, 3), px, py, tri - b * F)
        pixel = (b * height + py) * width + px  # (C,)
        best.scatter_reduce_(0, pixel, key, reduce="amin")
    face_id = torch.where(best == _EMPTY_KEY, torch.full_like(best, -1), best & 0xFFFFFFFF)
    return face_id.view(B, height, width)


def _triangle_boxes(corners: torch.Tensor, height: int, width: int):
    """Cull the triangles and box the pixel centres each one may cover.

    Args:
        corners: (BF, 3, 3) corner (pixel x, pixel y, depth z) of every triangle of the batch.
    Returns:
        boxes (BF, 4) long: x_lo, y_lo, box width, first candidate of the triangle;
        counts (BF,) long: candidates per triangle (box width x height, 0 when culled);
        starts (BF,) long: the first candidates again (a contiguous copy for searchsorted).
    """
    x, y, z = corners.unbind(-1)  # 3 x (BF, 3)
    # cull: behind/near the camera, back-facing or degenerate; the area is twice the signed
    # screen area, positive for front faces (counter-clockwise in model space)
    area = -_edge(x[:, 0], y[:, 0], x[:, 1], y[:, 1], x[:, 2], y[:, 2])  # (BF,)
    keep = (z.min(-1).values > NEAR) & (area > 1e-9)
    # bounding box of the pixel centres the triangle may cover, clamped to the image
    x_lo = x.min(-1).values.ceil().clamp(min=0)
    x_hi = x.max(-1).values.floor().clamp(max=width - 1)
    y_lo = y.min(-1).values.ceil().clamp(min=0)
    y_hi = y.max(-1).values.floor().clamp(max=height - 1)
    zero = torch.zeros_like(x_lo)
    # an empty box (triangle between pixel centres or off-screen) or a culled triangle: 0
    box_w = torch.where(keep, (x_hi - x_lo + 1).clamp(min=0), zero).long()  # (BF,)
    box_h = torch.where(keep, (y_hi - y_lo + 1).clamp(min=0), zero).long()
    x_lo, y_lo = torch.where(keep, x_lo, zero).long(), torch.where(keep, y_lo, zero).long()
    counts = box_w * box_h  # (BF,) candidates per triangle
    starts = counts.cumsum(0) - counts  # (BF,) first candidate of each triangle
    return torch.stack([x_lo, y_lo, box_w, starts], 1), counts, starts


def _chunks(starts: torch.Tensor, total: int, chunk_size: int) -> list:
    """Runs [t0, t1) of triangles whose candidates start in one window of chunk_size, so a
    chunk holds at most chunk_size + (largest box) candidates; empty runs are left out."""
    window_starts = torch.arange(0, total, chunk_size, device=starts.device)
    cuts = torch.searchsorted(starts, window_starts).tolist() + [starts.shape[0]]
    return [(t0, t1) for t0, t1 in zip(cuts[:-1], cuts[1:]) if t1 > t0]


def _candidate_pixels(boxes: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor,
                      t0: int, t1: int):
    """The (triangle, pixel) candidates of triangles t0..t1-1: every pixel centre of each box.

    Returns:
        tri, px, py: (C,) long triangle index (in the batch's BF) and pixel column and row.
    """
    n = counts[t0:t1]
    C = int(n.sum())
    device = boxes.device
    tri = torch.repeat_interleave(torch.arange(t0, t1, device=device), n, output_size=C)
    box = boxes.index_select(0, tri)  # (C, 4)
    # the k-th candidate of a triangle is pixel k of its box, row by row
    local = torch.arange(C, device=device) + starts[t0] - box[:, 3]  # (C,)
    px = box[:, 0] + local % box[:, 2]  # (C,) pixel centre
    py = box[:, 1] + local // box[:, 2]
    return tri, px, py


def _candidate_keys(corners: torch.Tensor, px: torch.Tensor, py: torch.Tensor,
                    face: torch.Tensor) -> torch.Tensor:
    """Visibility keys: the smallest key of a pixel is its nearest covering triangle.

    key = depth bits (float32, positive, so its bit pattern orders like the value) << 32 | f,
    so ties in depth go to the lower face id; a candidate outside its triangle gets the empty
    key, which never wins.

    Args:
        corners: (C, 3, 3) corner (pixel x, pixel y, depth z). px, py: (C,) pixel centre.
        face: (C,) long face id f in [0, F).
    Returns:
        (C,) int64 keys.
    """
    cx, cy, cz = corners.unbind(-1)  # 3 x (C, 3)
    w = _screen_weights(cx, cy, px.to(cx.dtype), py.to(cy.dtype))  # (C, 3)
    # 1/z is affine in screen space: z = 1 / sum_i (w_i / S) / z_i
    depth = w.sum(-1) / (w / cz).sum(-1)  # (C,)
    key = (_float_bits(depth) << 32) | face
    return torch.where((w >= 0).all(-1), key, torch.full_like(key, _EMPTY_KEY))


def _float_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 holding the IEEE bits of float32(values); monotone in the value for values > 0."""
    return values.float().view(torch.int32).long()


# ----------------------------------------------------------------------------- interpolation

def barycentrics(verts_pix: torch.Tensor, triangles: torch.Tensor,
                 face_id: torch.Tensor) -> Fragments:
    """Perspective-correct barycentric weights of the covered pixels (differentiable).

    Args:
        verts_pix: (B, V, 3) pixel x, pixel y, camera depth z (gradients flow to all three).
        triangles: (F, 3) long.
        face_id: (B, H, W) long from `rasterize`.
    Returns:
        Fragments with N = number of pixels where face_id >= 0.
    """
    B, V, _ = _check_points(verts_pix, "verts_pix")
    _, H, W = face_id.shape
    pixels = (face_id.reshape(-1) >= 0).nonzero().squeeze(1)  # (N,)
    b = pixels // (H * W)
    vertex_ids = triangles[face_id.reshape(-1)[pixels]] + (b * V)[:, None]  # (N, 3)
    # flat index_select: its backward is a cheap index_add
    corners = verts_pix.reshape(B * V, 3).index_select(0, vertex_ids.reshape(-1)).view(-1, 3, 3)
    x, y, z = corners.unbind(-1)  # 3 x (N, 3)
    px = (pixels % W).to(x.dtype)
    py = ((pixels // W) % H).to(x.dtype)
    w = _screen_weights(x, y, px, py)  # (N, 3) screen-space, un-normalised
    # perspective correction: lambda_i = (w_i / z_i) / sum_j (w_j / z_j)
    w_over_z = w / z
    weights = w_over_z / w_over_z.sum(-1, keepdim=True)  # (N, 3)
    return Fragments(pixels, vertex_ids, weights)


def interpolate(attributes: torch.Tensor, fragments: Fragments, *, height: int,
                width: int) -> torch.Tensor:
    """Interpolate per-vertex attributes at the covered pixels; zero elsewhere.

    Args:
        attributes: (B, V, C).
        fragments: from `barycentrics` on the same batch.
    Returns:
        (B, C, H, W).
    """
    B, V, C = attributes.shape
    corner_values = attributes.reshape(B * V, C).index_select(
        0, fragments.vertex_ids.reshape(-1)).view(-1, 3, C)  # (N, 3, C)
    # a(p) = sum_i lambda_i a_i
    values = (fragments.weights.unsqueeze(-1) * corner_values).sum(1)  # (N, C)
    flat = attributes.new_zeros(B * height * width, C).index_copy(0, fragments.pixels, values)
    return flat.view(B, height, width, C).permute(0, 3, 1, 2)  # (B, C, H, W)


# ----------------------------------------------------------------------------- render

def render(vertices: torch.Tensor, albedo: torch.Tensor, sh: torch.Tensor, pose: torch.Tensor,
           triangles: torch.Tensor, landmark_ids: torch.Tensor, *, height: int, width: int,
           adjacency: Optional[Adjacency] = None, saturate: bool = True) -> Rendered:
    """Render shaded faces: I_R = R(theta) of the paper, with region and landmarks.

    Like a camera, the image saturates: shaded colours above 1 (or below 0) are clipped to
    [0, 1], exactly as the synthetic data (`data.py`) and any photo are, so a face rendered
    from its own theta reproduces its image. Clipped pixels pass no gradient (the official
    code and Deep3D do not clip; `saturate=False` leaves the shaded colours as they are).

    Args:
        vertices: (B, V, 3) model space, mm.
        albedo: (B, V, 3) in [0, 1].
        sh: (B, 27) illumination phi.
        pose: (B, 6) camera c: pitch, yaw, roll (radians), translation (mm).
        triangles: (F, 3) long, counter-clockwise seen from the front.
        landmark_ids: (K,) long vertex ids (K = 68 for the face models).
        adjacency: `vertex_adjacency(triangles, V)`; pass it when rendering the same mesh
            repeatedly (it is computed here otherwise).
        saturate: clip the image to [0, 1] (a camera's response).
    Returns:
        Rendered(image (B, 3, H, W), region (B, 1, H, W), face_id (B, H, W),
        landmarks (B, K, 2)).
    """
    B, V, _ = _check_points(vertices, "vertices")
    if albedo.shape != vertices.shape:
        raise ValueError(f"albedo must be {tuple(vertices.shape)}, got {tuple(albedo.shape)}")
    world = rigid_transform(vertices, pose)  # (B, V, 3)
    verts_pix = project(world_to_camera(world), height=height, width=width)  # (B, V, 3)
    normals = vertex_normals(world, triangles, adjacency=adjacency)  # (B, V, 3)
    colors = shade(albedo, normals, sh)  # (B, V, 3)
    face_id = rasterize(verts_pix.detach(), triangles, height, width)  # (B, H, W)
    fragments = barycentrics(verts_pix, triangles, face_id)
    image = interpolate(colors, fragments, height=height, width=width)  # (B, 3, H, W)
    if saturate:
        image = image.clamp(0.0, 1.0)  # (B, 3, H, W)
    region = (face_id >= 0).unsqueeze(1).to(vertices.dtype)  # (B, 1, H, W)
    landmarks = verts_pix[:, landmark_ids, :2]  # (B, K, 2)
    return Rendered(image, region, face_id, landmarks)


# ----------------------------------------------------------------------------- checks

def _check_points(points: torch.Tensor, name: str):
    if not torch.is_tensor(points) or points.dim() != 3 or points.shape[-1] != 3:
        shape = tuple(points.shape) if torch.is_tensor(points) else type(points).__name__
        raise ValueError(f"{name} must be a (B, V, 3) tensor, got {shape}")
    return points.shape


def _check_triangles(triangles: torch.Tensor, num_vertices: int) -> None:
    if triangles.dim() != 2 or triangles.shape[1] != 3 or triangles.dtype != torch.long:
        raise ValueError(f"triangles must be an (F, 3) long tensor, got "
                         f"{tuple(triangles.shape)} {triangles.dtype}")
    if triangles.numel() and (int(triangles.min()) < 0 or int(triangles.max()) >= num_vertices):
        raise ValueError(f"triangle vertex ids must lie in [0, {num_vertices})")
