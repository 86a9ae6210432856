"""The perceptual network F: a frozen face-recognition network and its alignment crop.

Paper map (Li et al., CVPR 2023). F appears in three losses of Sec. 3.2:

    L_dist  = cos(F(I_T * M), F(I_R * M))     Eq. 2    early feature map
    L_presv = cos(F(I_T * M), F(I_T))         Eq. 4    early feature map
    L_per   = cos(F(I_T), F(I_R))             Eq. 6    identity embedding

The paper uses a pre-trained ArcFace (Sec. 4.1); the official code compares ArcFace's first
residual stage (64 x 56 x 56) for Eq. 2 and 4 and the 512-d embedding for Eq. 6, on faces
aligned to ArcFace's 112 x 112 template with a 5-point similarity. `forward` returns both, as
`PerceptualFeatures(early, embedding)`; the loss code picks one.

What is here, top to bottom:
    alignment        `five_points`, `fit_similarity`, `align_crop`, the two templates
    dlib reader      `read_dlib_net`: dlib's binary network format, parsed in Python
    dlib ResNet      `DlibResNet`, `load_dlib_resnet` (default F; 150 x 150 in, 128-d out)
    ArcFace          `IResNet`, `load_arcface` (insightface iresnet50/100 `backbone.pth`)
    F                `FaceRecognitionFeatures` (crop + network, frozen), `load_perceptual`

Conventions: images `(B, 3, H, W)` RGB in [0, 1]; landmarks `(B, 68, 2)` pixel coordinates
(x right, y down, pixel centres at integers; the iBUG 68-point scheme, 0-based). Chips are the
aligned crops the networks see, `(B, 3, S, S)` in [0, 1]. F is frozen (parameters without
gradient, evaluation mode that `.train()` cannot undo) but differentiable with respect to its
input images; gradients also reach the landmarks through the crop, which does not matter when
the landmarks are data.

Which F. ArcFace weights need a manual download (insightface's model zoo), so the default F is
dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`, CC0, shipped by the
PyPI package `face-recognition-models`), ported to PyTorch and read without dlib. Its early map
is likewise the output of its first residual stage, `(B, 32, 35, 35)`; its embedding is 128-d
(dlib calls faces the same person below an L2 distance of 0.6). `load_perceptual("none")`
returns None, which the loss assembly reads as "leave the perceptual terms out" (the paper's
'Neighbor' ablation, Sec. 4.4).

Deviations from the paper:
- Default F is dlib's ResNet, not ArcFace (weights that ship offline); ArcFace is an option
  (`load_perceptual("arcface:PATH")`).
- The official code feeds ArcFace images in [0, 1] (it computes `2x - 1` and then overwrites
  it); we normalise as ArcFace was trained, (x - 0.5) / 0.5.
- dlib aligns its chip with 33 of the 68 landmarks; we use the 5 points of Deep3D and FOCUS
  (eye centres as the mean of the eye corners, nose tip, mouth corners) for both networks,
  mapped to dlib's mean face at padding 0.25. On two test photos our embedding is 0.085 and
  0.11 (L2) from dlib's descriptor; dlib's own 2-jitter average moves it by about 0.15, and
  dlib's same-person threshold is 0.6 (tests/test_perceptual.py).
- The crop is one bilinear `grid_sample` without pre-filtering; dlib first halves the image
  (pyramid) when the face spans more than 2 image pixels per chip pixel, which never happens
  with FOCUS's 224 x 224 crops.

Test: `python -m pytest -q tests/test_perceptual.py`
"""
import importlib.util
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bfm


class PerceptualFeatures(NamedTuple):
    """What F returns: an early feature map (Eq. 2, 4) and the identity embedding (Eq. 6)."""
    early: Tensor  # (B, C, h, w)
    embedding: Tensor  # (B, D)


# ----------------------------------------------------------------------------------------------
# alignment: 5 points, a closed-form similarity, one grid_sample
# ----------------------------------------------------------------------------------------------

# dlib's mean face (get_face_chip_details): x and y of landmarks 17..67 in a unit square.
_DLIB_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689)
_DLIB_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182)

# insightface's 5-point ArcFace template for 112 x 112 chips (arcface_dst), pixel centres at
# integers (it is used with cv2.warpAffine).
ARCFACE_TEMPLATE_112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                        (41.5493, 92.3655), (70.7299, 92.2041))


def five_points(landmarks: Tensor) -> Tensor:
    """The 5 alignment points of 68 landmarks: eye centres, nose tip, mouth corners (Deep3D's
    points, `bfm.five_points`; order: eye on the image's left, eye on the right, nose, mouth
    left, mouth right), differentiable.

    Args:
        landmarks: (B, 68, 2) pixel coordinates.
    Returns:
        (B, 5, 2), in the order of `ARCFACE_TEMPLATE_112`.
    """
    if not isinstance(landmarks, Tensor) or landmarks.dim() != 3 or landmarks.shape[1:] != (68, 2):
        shape = tuple(landmarks.shape) if isinstance(landmarks, Tensor) else type(landmarks)
        raise ValueError(f"landmarks must be a (B, 68, 2) tensor, got {shape}")
    return bfm.five_points(landmarks)  # (B, 5, 2)


def dlib_template(*, size: int = 150, padding: float = 0.25) -> Tensor:
    """The 5 points of dlib's mean face on its size x size face chip, in chip pixels.

    dlib places its mean face m (unit square) at (padding + m) / (1 + 2 padding) * size in a
    continuous chip frame where pixel i covers [i, i + 1]; with pixel centres at integers that
    is 1/2 less. (dlib's chip extraction also stretches the chip by (size - 1/s) / (size - 1)
    about its centre, s = image pixels per chip pixel; we leave that out: at most 0.3% for s in
    [0.7, 1.5].)

    Returns:
        (5, 2) float64, in the order of `five_points`.
    """
    mean_face = torch.tensor([_DLIB_MEAN_FACE_X, _DLIB_MEAN_FACE_Y], dtype=torch.float64).T
    full = torch.cat([torch.zeros(17, 2, dtype=torch.float64), mean_face])[None]  # (1, 68, 2)
    # (padding + m) / (1 + 2 padding) * size - 1/2
    return (padding + five_points(full)[0]) / (1 + 2 * padding) * size - 0.5  # (5, 2)


def fit_similarity(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity dst ~ s R src + t, in closed form (differentiable).

    With centred points p = src - mean, q = dst - mean, the model q = [[a, -b], [b, a]] p has
    the linear least-squares solution a = sum(p . q) / sum |p|^2, b = sum(p x q) / sum |p|^2
    (s = |(a, b)|, no reflection). The fit is exact when dst is a similarity image of src.

    Args:
        src: (B, N, 2) or (N, 2), N >= 2 points not all equal.
        dst: (B, N, 2).
    Returns:
        (B, 2, 3) matrices A with dst ~ A[:, :, :2] src + A[:, :, 2].
    """
    B, N, _ = dst.shape
    src = src.expand(B, N, 2)  # (B, N, 2)
    src_mean, dst_mean = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)  # (B, 1, 2)
    p, q = src - src_mean, dst - dst_mean  # (B, N, 2)
    norm2 = (p ** 2).sum(dim=(1, 2))  # (B,)
    if bool((norm2 == 0).any()):
        raise ValueError("fit_similarity: the source points of a sample all coincide")
    # a = sum(p . q) / sum |p|^2
    a = (p * q).sum(dim=(1, 2)) / norm2  # (B,)
    # b = sum(p_x q_y - p_y q_x) / sum |p|^2
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(dim=1) / norm2  # (B,)
    linear = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], dim=1)  # (B, 2, 2)
    # t = mean(dst) - s R mean(src)
    t = dst_mean[:, 0] - (linear @ src_mean[:, 0, :, None])[..., 0]  # (B, 2)
    return torch.cat([linear, t[..., None]], dim=2)  # (B, 2, 3)


def _pixel_to_normalized(size_x: int, size_y: int, ref: Tensor) -> Tensor:
    """3 x 3 map from pixel coordinates (centres at integers) to grid_sample's [-1, 1] frame."""
    # n = (2 p + 1) / size - 1   (align_corners=False)
    return torch.tensor([[2.0 / size_x, 0.0, 1.0 / size_x - 1.0],
                         [0.0, 2.0 / size_y, 1.0 / size_y - 1.0],
                         [0.0, 0.0, 1.0]], dtype=ref.dtype, device=ref.device)


def align_crop(images: Tensor, landmarks: Tensor, *, template: Tensor, size: int) -> Tensor:
    """Aligned face chips: a 5-point similarity to `template`, then bilinear resampling.

    The similarity T (chip pixels -> image pixels) is `fit_similarity(template, five_points)`,
    computed with autograd (differentiable in the landmarks). Chip pixel u samples the image at
    T(u) with `affine_grid` + `grid_sample` (bilinear, zeros outside the image), so the chip is
    differentiable in the images.

    Args:
        images: (B, C, H, W).
        landmarks: (B, 68, 2) pixel coordinates in `images`.
        template: (5, 2) positions of the five points in the chip, in chip pixels.
        size: chip side S in pixels.
    Returns:
        (B, C, S, S) chips.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images)}")
    B, C, H, W = images.shape
    points = five_points(landmarks)  # (B, 5, 2)
    if points.shape[0] != B:
        raise ValueError(f"landmarks hold {points.shape[0]} samples, images {B}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("landmarks must be finite")
    if template.shape != (5, 2) or size < 1:
        raise ValueError(f"template must be (5, 2) and size >= 1, "
                         f"got {tuple(template.shape)} and {size}")
    points = points.to(images.dtype)  # (B, 5, 2)
    similarity = fit_similarity(template.to(points), points)  # (B, 2, 3)
    homogeneous = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=points.dtype, device=points.device)
    similarity = torch.cat([similarity, homogeneous.expand(B, 1, 3)], dim=1)  # (B, 3, 3)
    # theta = N_image T N_chip^-1: chip's normalised frame -> image's normalised frame
    to_chip_pixels = torch.linalg.inv(_pixel_to_normalized(size, size, points))  # (3, 3)
    theta = _pixel_to_normalized(W, H, points) @ similarity @ to_chip_pixels  # (B, 3, 3)
    grid = F.affine_grid(theta[:, :2], [B, C, size, size], align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)  # (B, C, S, S)


# ----------------------------------------------------------------------------------------------
# dlib's network file, read in Python
# ----------------------------------------------------------------------------------------------
# dlib writes a network outside-in: each add_layer writes its version and then its sub-network
# before its own layer, so the file is: loss version, loss layer, one version per wrapper (tag,
# skip and add_layer, outermost first), the input layer, then one record per computational
# layer from input to output. A record is the layer's name and fields, then add_layer's three
# flags ('0'/'1' bytes) and three (empty) tensors; the innermost record adds one integer.
# Integers: one header byte (low 4 bits = number of bytes that follow, bit 7 = sign), then
# little-endian bytes. Floats: integer mantissa m and exponent e, value m * 2^e. A string is its
# length then its bytes. A tensor is: version 2, n, k, nr, nc, then n*k*nr*nc float32 (LE).

class DlibLayer(NamedTuple):
    """One computational layer of a dlib network file, in PyTorch layout."""
    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc
    # con: weight (O, I, kh, kw), bias (O,); affine: gamma, beta (C,); fc: weight (O, I)
    tensors: dict
    config: dict  # con, pools: stride, padding, kernel (pools; 0 = whole input)


class DlibNet(NamedTuple):
    """A parsed dlib network file: input size, input mean and layers from input to output."""
    input_size: tuple  # (rows, cols)
    input_mean: tuple  # (red, green, blue) on the 0..255 scale
    layers: list  # [DlibLayer]


class _DlibStream:
    """A cursor over the bytes of a dlib file, reading dlib's serialisation primitives."""

    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated dlib file (wanted {n} bytes at {self.pos})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        header = self._take(1)[0]
        size = header & 0x0F
        if size > 8:
            raise ValueError(f"{self.path}: bad integer header {header:#x} at {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if header & 0x80 else value

    def real(self) -> float:
        # value = mantissa * 2^exponent
        mantissa = self.integer()
        return float(mantissa * 2.0 ** self.integer())

    def string(self) -> str:
        return self._take(self.integer()).decode("latin-1")

    def flag(self) -> bool:
        byte = self._take(1)
        if byte not in (b"0", b"1"):
            raise ValueError(f"{self.path}: expected a '0'/'1' flag at {self.pos - 1}, "
                             f"got {byte!r}")
        return byte == b"1"

    def tensor(self) -> Tensor:
        version = self.integer()
        if version != 2:
            raise ValueError(f"{self.path}: unsupported tensor version {version} at {self.pos}")
        shape = [self.integer() for _ in range(4)]  # n, k, nr, nc
        count = int(np.prod(shape))
        values = np.frombuffer(self._take(4 * count), dtype="<f4").reshape(shape)
        return torch.from_numpy(values.astype(np.float32))  # (n, k, nr, nc)

    def alias(self) -> tuple:
        # alias_tensor: version 1, then its shape n, k, nr, nc (the data lives in `params`)
        if self.integer() != 1:
            raise ValueError(f"{self.path}: unsupported alias_tensor version at {self.pos}")
        return tuple(self.integer() for _ in range(4))

    def expect(self, name: str) -> None:
        found = self.string()
        if found != name:
            raise ValueError(f"{self.path}: expected '{name}' at {self.pos}, found '{found}'")


def _read_con(s: _DlibStream) -> DlibLayer:
    params = s.tensor().flatten()  # (O*I*kh*kw + O,)
    num_filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (s.integer() for _ in range(7))
    filters, biases = s.alias(), s.alias()  # (O, I, kh, kw), (1, O, 1, 1)
    for _ in range(4):
        s.real()  # learning-rate and weight-decay multipliers
    n_filter = int(np.prod(filters))
    consistent = filters[0] == num_filters and filters[2:] == (rows, cols)
    if not consistent or params.numel() != n_filter + num_filters:
        raise ValueError(f"{s.path}: inconsistent con_ layer before {s.pos}")
    weight = params[:n_filter].reshape(filters)  # (O, I, kh, kw), PyTorch's layout
    return DlibLayer("con", {"weight": weight, "bias": params[n_filter:]},
                     {"stride": (stride_y, stride_x), "padding": (pad_y, pad_x)})


def _read_affine(s: _DlibStream) -> DlibLayer:
    params = s.tensor().flatten()  # (2 C,): gamma then beta
    gamma, _ = s.alias(), s.alias()  # (1, C, 1, 1) twice
    s.integer()  # mode: 0 = per channel
    channels = int(np.prod(gamma))
    return DlibLayer("affine", {"gamma": params[:channels], "beta": params[channels:]}, {})


def _read_pool(kind: str):
    def read(s: _DlibStream) -> DlibLayer:
        rows, cols, stride_y, stride_x, pad_y, pad_x = (s.integer() for _ in range(6))
        return DlibLayer(kind, {}, {"kernel": (rows, cols), "stride": (stride_y, stride_x),
                                    "padding": (pad_y, pad_x)})
    return read


def _read_fc(s: _DlibStream) -> DlibLayer:
    num_outputs, num_inputs = s.integer(), s.integer()
    params = s.tensor()  # (I, O, 1, 1) (+ a bias row when bias_mode = 0)
    s.alias(), s.alias()  # weights, biases
    if s.integer() != 1:
        raise ValueError(f"{s.path}: only fc layers without bias (fc_no_bias) are supported")
    for _ in range(4):
        s.real()  # multipliers
    if tuple(params.shape[:2]) != (num_inputs, num_outputs):
        raise ValueError(f"{s.path}: inconsistent fc_ layer before {s.pos}")
    # y = x W with W (I, O): PyTorch's Linear weight is W^T
    return DlibLayer("fc", {"weight": params[:, :, 0, 0].T.contiguous()}, {})


_RECORD_READERS = {
    "con_4": _read_con,
    "affine_": _read_affine,
    "relu_": lambda s: DlibLayer("relu", {}, {}),
    "add_prev_": lambda s: DlibLayer("add_prev", {}, {}),
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "fc_2": _read_fc,
}


def read_dlib_net(path: str) -> DlibNet:
    """Parse a dlib network file holding a loss_metric network on an RGB input (no dlib needed).

    Supports the layer types of dlib's face-recognition ResNet: con_, affine_, relu_,
    add_prev_, max_pool_, avg_pool_, fc_ (no bias), tags and skips. Raises ValueError on
    anything else, on truncation and on trailing bytes.
    """
    with open(path, "rb") as handle:
        s = _DlibStream(handle.read(), path)
    s.integer()  # add_loss_layer version
    s.expect("loss_metric_2")
    s.real(), s.real()  # margin, distance threshold
    versions = [s.integer()]
    while versions[-1] in (1, 2):  # tag/skip (1) and add_layer (2) wrappers, outermost first
        versions.append(s.integer())
    if versions[-1] != 3:
        raise ValueError(f"{path}: expected the input-level add_layer (version 3), "
                         f"found version {versions[-1]}")
    s.expect("input_rgb_image_sized")
    input_mean = (s.real(), s.real(), s.real())
    input_size = (s.integer(), s.integer())
    layers = []
    for index in range(versions.count(2) + 1):
        name = s.string()
        if name not in _RECORD_READERS:
            raise ValueError(f"{path}: unsupported dlib layer '{name}'")
        layers.append(_RECORD_READERS[name](s))
        s.flag(), s.flag(), s.flag()  # setup called, gradient stale, output disabled
        s.tensor(), s.tensor(), s.tensor()  # x_grad, cached_output, params_grad
        if index == 0:
            s.integer()  # the input-level add_layer's sample expansion factor
    if s.pos != len(s.data):
        raise ValueError(f"{path}: {len(s.data) - s.pos} unexpected bytes after the last layer")
    return DlibNet(input_size, input_mean, layers)


# ----------------------------------------------------------------------------------------------
# dlib's face-recognition ResNet in PyTorch
# ----------------------------------------------------------------------------------------------
# dlib_face_recognition_resnet_model_v1 (dlib's dnn_face_recognition_ex.cpp), input to output:
# conv 7x7/2 (32) -> affine -> relu -> max-pool 3/2 -> residual blocks -> global average pool
# -> fc 256 -> 128 (no bias). A block is conv 3x3 -> affine -> relu -> conv 3x3 -> affine, plus a
# shortcut (identity, or 2x2/2 average pooling in a downsampling block), then relu. Every
# stride-2 layer has no padding, stride-1 convolutions pad by 1; the residual add zero-fills
# channels and space to the larger shape (top-left aligned), as dlib's add_prev does.
# Downsampling flags of the blocks, input to output (levels of 3, 1+3, 1+2, 1+2, 1 blocks):
DLIB_DOWNSAMPLE = (False,) * 3 + (True,) + (False,) * 3 + (True,) + (False,) * 2 \
    + (True,) + (False,) * 2 + (True,)


def dlib_layer_kinds(downsample: Sequence[bool]) -> list:
    """The sequence of layer kinds in a dlib ResNet file with these blocks."""
    kinds = ["con", "affine", "relu", "max_pool"]
    for down in downsample:
        pool = ["avg_pool"] if down else []
        kinds += ["con", "affine", "relu", "con", "affine"] + pool + ["add_prev", "relu"]
    return kinds + ["avg_pool", "fc"]


class Affine(nn.Module):
    """dlib's affine_ layer: a frozen per-channel batch norm, y = gamma x + beta."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma[:, None, None] + self.beta[:, None, None]  # (B, C, h, w)


def add_zero_fill(a: Tensor, b: Tensor) -> Tensor:
    """a + b after zero-padding both to the larger channel count and size (top-left aligned)."""
    C, H, W = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def fill(x: Tensor) -> Tensor:
        return F.pad(x, (0, W - x.shape[3], 0, H - x.shape[2], 0, C - x.shape[1]))  # (B, C, H, W)
    return fill(a) + fill(b)  # (B, C, H, W)


class DlibBlock(nn.Module):
    """One residual block of dlib's ResNet (see the comment above DLIB_DOWNSAMPLE)."""

    def __init__(self, in_channels: int, channels: int, *, downsample: bool):
        super().__init__()
        self.downsample = downsample
        stride, padding = (2, 0) if downsample else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=padding)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = Affine(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.affine1(self.conv1(x)))  # (B, C', h', w')
        y = self.affine2(self.conv2(y))  # (B, C', h', w')
        shortcut = F.avg_pool2d(x, 2, stride=2) if self.downsample else x  # (B, C, h'', w'')
        return F.relu(add_zero_fill(y, shortcut))  # (B, max C, max h, max w)


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: 150 x 150 chips in [0, 1] -> PerceptualFeatures.

    `early` is the output of the first residual stage (the blocks before the first
    downsampling one), (B, 32, 35, 35) for the released network; `embedding` is (B, 128).
    """

    def __init__(self, stem_channels: int, block_channels: Sequence[int], embedding_dim: int, *,
                 downsample: Sequence[bool] = DLIB_DOWNSAMPLE, input_size: int = 150,
                 input_mean: Sequence[float] = (122.782, 117.001, 104.298)):
        super().__init__()
        if len(block_channels) != len(downsample) or not any(downsample):
            raise ValueError("block_channels and downsample must have one entry per block, "
                             "with at least one downsampling block")
        self.input_size = input_size
        self.register_buffer("input_mean", torch.tensor(input_mean, dtype=torch.float32))
        self.stem = nn.Conv2d(3, stem_channels, 7, stride=2, padding=0)
        self.stem_affine = Affine(stem_channels)
        widths = [stem_channels] + list(block_channels)
        self.blocks = nn.ModuleList(DlibBlock(widths[i], widths[i + 1], downsample=down)
                                    for i, down in enumerate(downsample))
        self.early_blocks = list(downsample).index(True)
        self.fc = nn.Linear(widths[-1], embedding_dim, bias=False)

    def forward(self, chips: Tensor) -> PerceptualFeatures:
        if chips.dim() != 4 or chips.shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(f"DlibResNet takes (B, 3, {self.input_size}, {self.input_size}) "
                             f"chips, got {tuple(chips.shape)}")
        # x = (255 I - mean_rgb) / 256 (dlib's input_rgb_image)
        x = (255.0 * chips - self.input_mean[:, None, None]) / 256.0  # (B, 3, 150, 150)
        x = F.relu(self.stem_affine(self.stem(x)))  # (B, 32, 72, 72)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 32, 35, 35)
        early = x
        for index, block in enumerate(self.blocks):
            x = block(x)  # (B, C, h, w)
            if index + 1 == self.early_blocks:
                early = x  # (B, 32, 35, 35)
        embedding = self.fc(x.mean(dim=(2, 3)))  # (B, 128)
        return PerceptualFeatures(early, embedding)


def dlib_resnet_from(net: DlibNet) -> DlibResNet:
    """Build a DlibResNet from a parsed file, checking its layers against the architecture."""
    kinds = [layer.kind for layer in net.layers]
    if kinds != dlib_layer_kinds(DLIB_DOWNSAMPLE):
        raise ValueError("the dlib file does not hold dlib's face-recognition ResNet "
                         f"(layer kinds {kinds[:8]}...)")
    convs = [layer for layer in net.layers if layer.kind == "con"]
    affines = [layer for layer in net.layers if layer.kind == "affine"]
    if net.input_size[0] != net.input_size[1] or convs[0].config["stride"] != (2, 2):
        raise ValueError(f"unexpected dlib input size {net.input_size} or stem stride")
    fc = net.layers[-1].tensors["weight"]  # (D, C)
    model = DlibResNet(convs[0].tensors["weight"].shape[0],
                       [conv.tensors["weight"].shape[0] for conv in convs[1::2]], fc.shape[0],
                       input_size=net.input_size[0], input_mean=net.input_mean)
    modules = [(model.stem, model.stem_affine)]
    for block in model.blocks:
        modules += [(block.conv1, block.affine1), (block.conv2, block.affine2)]
    geometry = [(conv.stride, conv.padding, tuple(conv.weight.shape[1:])) for conv, _ in modules]
    in_file = [(con.config["stride"], con.config["padding"], tuple(con.tensors["weight"].shape[1:]))
               for con in convs]
    if geometry != in_file:
        raise ValueError("the dlib file's convolutions (stride, padding, kernel) differ from "
                         "dlib's face-recognition ResNet")
    with torch.no_grad():
        for (conv, affine), con, aff in zip(modules, convs, affines):
            conv.weight.copy_(con.tensors["weight"])
            conv.bias.copy_(con.tensors["bias"])
            affine.gamma.copy_(aff.tensors["gamma"])
            affine.beta.copy_(aff.tensors["beta"])
        model.fc.weight.copy_(fc)
    return model


DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def dlib_model_path() -> str:
    """Where `face-recognition-models` keeps dlib's network (the package is never imported)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default perceptual network needs dlib's face-recognition "
                                "weights: pip install face-recognition-models (about 100 MB)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", DLIB_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall with "
                                "pip install --force-reinstall face-recognition-models")
    return path


def load_dlib_resnet(path: Optional[str] = None) -> DlibResNet:
    """dlib's face-recognition ResNet from `path` (default: the face-recognition-models file)."""
    path = dlib_model_path() if path is None else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such dlib network file")
    return dlib_resnet_from(read_dlib_net(path))


# ----------------------------------------------------------------------------------------------
# ArcFace: insightface's iresnet (arcface_torch backbones), key-compatible with backbone.pth
# ----------------------------------------------------------------------------------------------

ARCFACE_LAYERS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    """iresnet block: bn1 -> conv1 -> bn2 -> prelu -> conv2 (stride) -> bn3, plus shortcut."""

    def __init__(self, in_channels: int, channels: int, *, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5))

    def forward(self, x: Tensor) -> Tensor:
        y = self.prelu(self.bn2(self.conv1(self.bn1(x))))  # (B, C', h, w)
        y = self.bn3(self.conv2(y))  # (B, C', h', w')
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, C', h', w')
        return y + shortcut  # (B, C', h', w')


class IResNet(nn.Module):
    """ArcFace's iresnet50/100: 112 x 112 chips in [0, 1] -> PerceptualFeatures.

    `early` is layer1's output, (B, 64, 56, 56) (the official FOCUS code's `is_shallow`);
    `embedding` is the 512-d `features` output. Dropout before fc (insightface, p = 0 or 0.4)
    has no weights and is the identity in evaluation, so it is left out.
    """

    def __init__(self, layers: Sequence[int] = ARCFACE_LAYERS[50], embedding_dim: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        widths = (64, 64, 128, 256, 512)
        for stage, blocks in enumerate(layers):
            stage_blocks = [IBasicBlock(widths[stage] if i == 0 else widths[stage + 1],
                                        widths[stage + 1], stride=2 if i == 0 else 1)
                            for i in range(blocks)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=1e-5)

    def forward(self, chips: Tensor) -> PerceptualFeatures:
        if chips.dim() != 4 or chips.shape[1:] != (3, 112, 112):
            raise ValueError(f"IResNet takes (B, 3, 112, 112) chips, got {tuple(chips.shape)}")
        # x = (I - 0.5) / 0.5
        x = (chips - 0.5) / 0.5  # (B, 3, 112, 112)
        x = self.prelu(self.bn1(self.conv1(x)))  # (B, 64, 112, 112)
        early = self.layer1(x)  # (B, 64, 56, 56)
        x = self.layer4(self.layer3(self.layer2(early)))  # (B, 512, 7, 7)
        embedding = self.features(self.fc(self.bn2(x).flatten(1)))  # (B, 512)
        return PerceptualFeatures(early, embedding)


def load_arcface(path: str, *, depth: int = 50) -> IResNet:
    """insightface's iresnet`depth` from a `backbone.pth` state_dict (key names unchanged).

    A uniform 'module.' prefix (DataParallel) is removed; missing BatchNorm `num_batches_tracked`
    counters are allowed (they do not change the output); any other missing or unexpected key is
    an error.
    """
    if depth not in ARCFACE_LAYERS:
        raise ValueError(f"ArcFace depth must be one of {sorted(ARCFACE_LAYERS)}, got {depth}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no ArcFace weights there. Download insightface's "
                                "arcface_torch iresnet50 or iresnet100 backbone.pth (model zoo of "
                                "github.com/deepinsight/insightface) and pass its path")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: expected a state_dict (name -> tensor)")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    model = IResNet(ARCFACE_LAYERS[depth])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        other = 100 if depth == 50 else 50
        raise ValueError(f"{path} is not an insightface iresnet{depth} state_dict: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]} (an iresnet{other} file "
                         f"needs the spec 'arcface{other}:PATH')")
    return model


# ----------------------------------------------------------------------------------------------
# F: crop + network, frozen
# ----------------------------------------------------------------------------------------------

class FaceRecognitionFeatures(nn.Module):
    """The perceptual network F(images, landmarks) -> PerceptualFeatures, frozen.

    Crops each face with `align_crop` to the backbone's template and runs the backbone. Pass the
    same landmarks for both images of a pair (e.g. lm_T for I_T and I_R) so their early feature
    maps are spatially comparable. Parameters have requires_grad False and the module stays in
    evaluation mode (`train()` is a no-op), so batch-norm statistics never change; gradients
    flow to the input images.
    """

    def __init__(self, backbone: nn.Module, *, template: Tensor, chip_size: int):
        super().__init__()
        self.backbone = backbone
        self.chip_size = chip_size
        self.register_buffer("template", template.to(torch.float32))
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FaceRecognitionFeatures":
        return super().train(False)

    def forward(self, images: Tensor, landmarks: Tensor) -> PerceptualFeatures:
        """Args: images (B, 3, H, W) in [0, 1]; landmarks (B, 68, 2) pixels in `images`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got {tuple(images.shape)}")
        chips = align_crop(images, landmarks, template=self.template, size=self.chip_size)
        return self.backbone(chips)  # early (B, C, h, w), embedding (B, D)


def load_perceptual(spec: str = "dlib", device=None) -> Optional[FaceRecognitionFeatures]:
    """The perceptual network F named by `spec`, frozen, on `device` (default CPU).

    Specs: "dlib" (default: dlib's ResNet from face-recognition-models), "dlib:PATH" (that
    file), "arcface:PATH" (iresnet50), "arcface100:PATH" (iresnet100), "none" (returns None: the
    perceptual losses are left out).
    """
    kind, _, path = spec.partition(":")
    if kind == "none" and not path:
        return None
    if kind == "dlib":
        backbone = load_dlib_resnet(path or None)
        size = backbone.input_size
        model = FaceRecognitionFeatures(backbone, template=dlib_template(size=size), chip_size=size)
    elif kind in ("arcface", "arcface50", "arcface100") and path:
        backbone = load_arcface(path, depth=100 if kind == "arcface100" else 50)
        model = FaceRecognitionFeatures(backbone, template=torch.tensor(ARCFACE_TEMPLATE_112),
                                        chip_size=112)
    else:
        raise ValueError(f"unknown perceptual network spec {spec!r}: use 'dlib', 'dlib:PATH', "
                         "'arcface:PATH', 'arcface100:PATH' or 'none'")
    return model.to(device) if device is not None else model
