"""The networks of FOCUS: the face encoder, the segmentation UNet and the face autoencoder R.

Paper map (Li et al., CVPR 2023, Sec. 3.1 and Fig. 2; Sec. 4.1; Supp. A.2):
- `ResNet50`: the encoder's trunk, "the structure of the ResNet 50" (Sec. 4.1). Its
  `state_dict` has exactly the keys and shapes of torchvision's `resnet50` (320 entries,
  25,557,032 parameters), so an ImageNet checkpoint loads with `load_imagenet_weights`.
- `Encoder`: image I_T -> theta = [alpha_id 80 | alpha_exp 64 | gamma 80 | phi 27 | c 6] in
  R^257 (Sec. 3.1), returned as `bfm.Theta`. ResNet-50 trunk, global average pool, one linear
  layer 2048 -> 257 initialised to zero (so theta = 0 at the start: the mean face, frontal,
  about 1 m from the camera, under ambient light), then a fixed per-output scale (below).
- `UNet`: the segmentation network S (Fig. 2a): M = S(I_R, I_T) in (0, 1)^(H x W), the
  probability that a pixel shows the face. The architecture of the official code: the two
  images stacked into 6 channels, widths 64-128-256-512-1024, four 2 x 2 max-poolings, a
  double 3 x 3 conv + BN + ReLU per level, dropout 0.5 after the two deepest encoder blocks,
  nearest-neighbour upsampling followed by 3 x 3 conv + BN + ReLU, skip concatenation, a 1 x 1
  output conv and sigmoid(5 x logit). 34,528,769 parameters (the paper's 34.5M, Supp. A.2).
- `FaceAutoencoder`: R = encoder + face model (`bfm.MorphableModel`) + renderer
  (`renderer.render`), I_R = R(theta) (Sec. 3.1); `decode` is its theta-to-render half, the
  one fit.py fits through; `reconstruct` is the inference path of Fig. 2b (reconstruction and
  mask in one call, without gradients); `apply_misfit_prior` corrects a predicted shape by the
  misfit prior, P - E_MP (Sec. 3.4).
- `oracle_theta`, `oracle_render`: not in the paper. The parameters of an oracle R, each
  synthetic face's own theta with optional noise on identity, expression and albedo, and their
  render: an R that fits as well as wanted, to measure how good R must be for S to learn
  outliers (train.py `r_source`).

Conventions: B batch, V vertices, H x W image. Images (B, 3, H, W) with values in [0, 1];
masks (B, 1, H, W); vertices (B, V, 3) in model space, millimetres. Every network takes its
device and dtype from its parameters and inputs; nothing here calls `.cuda()`.

Encoder output scaling (official code, `proc` in its training scripts, "adjust learning
rate"): the raw linear outputs are multiplied by fixed factors before use, which sets how fast
each group of theta moves under the optimiser:
- rotations (pitch, yaw, roll): x 0.3, radians;
- translation x, y: x 1, millimetres;
- translation z (depth): x 0.005, millimetres. The official camera also sits 1000 mm from the
  face and its translations are in the BFM's millimetres, exactly our units (`renderer.py`:
  camera at z = 1000 mm, translation in mm), so the official factor carries over unchanged.
  Depth is nearly fixed at 1 m; apparent size is mostly explained by the identity
  coefficients (size and distance are almost interchangeable at a 12.5 deg field of view);
- albedo gamma: x 3, standard deviations; identity, expression and illumination: x 1.
The returned theta is the scaled one (what the face model and renderer consume and what
L_reg penalises). All factors are keyword arguments of `Encoder`.

Input normalisation: the encoder standardises images with the ImageNet channel mean and
standard deviation, x = (I - mean) / std, the statistics ImageNet weights were trained with.

Deviations from the paper and the official code:
- The official encoder keeps torchvision's 1000-way ImageNet classifier (zeroed) and slices
  its first outputs; ours has a 2048 -> 257 head, so the encoder has 24,034,625 parameters,
  not 25.6M (25,557,032 = ResNet-50 with its 1000-way head, the paper's count).
- The official code feeds [0, 1] images without ImageNet standardisation; we standardise.
- `width` (keyword of `ResNet50`, `Encoder`, `UNet`) scales every channel count of the same
  architecture (base width 64 = the paper's networks). The `cpu` preset uses a smaller width
  so training fits a laptop; parameter counts then shrink about quadratically.
- No ImageNet download is possible here: networks start from random (Kaiming) initialisation;
  a user with torchvision's `resnet50` checkpoint loads it with `load_imagenet_weights`.

Run `python -m pytest -q tests/test_focus.py` to test this module and
`python bench/bench_networks.py --batch 2` to time the networks.
"""
import contextlib
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bfm import THETA_SIZES, MorphableModel, Theta, join_theta, split_theta
from renderer import Adjacency, render, vertex_adjacency

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
THETA_DIM = sum(THETA_SIZES.values())  # 257
RESNET50_BLOCKS = (3, 4, 6, 3)  # bottleneck blocks in layer1..layer4
UNET_LEVELS = 5  # resolutions of the UNet: H, H/2, H/4, H/8, H/16


# ----------------------------------------------------------------------------- ResNet-50

class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride here) -> 1x1, plus shortcut."""
    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, 4p, H', W')
        y = F.relu(self.bn1(self.conv1(x)))  # (B, p, H, W)
        y = F.relu(self.bn2(self.conv2(y)))  # (B, p, H', W')
        y = self.bn3(self.conv3(y))  # (B, 4p, H', W')
        return F.relu(y + shortcut)  # (B, 4p, H', W')


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016) with torchvision's exact `state_dict` layout.

    With the defaults (`num_classes=1000`, `width=64`) the keys and shapes equal
    `torchvision.models.resnet50()`'s. `width` scales every channel count: stem `width`,
    stages `width * (1, 2, 4, 8)` bottleneck planes, `32 * width` pooled features.
    `stem_pool=False` drops the stem's max-pooling (no parameters change), so every later map
    is twice as large: a 64 x 64 input then leaves 4 x 4 at layer4 instead of 2 x 2.
    `zero_init_residual=True` starts the last batch norm of every residual branch at 0, so each
    block starts as the identity (Goyal et al. 2017; torchvision's option of the same name):
    a network trained from scratch learns much sooner. It changes no parameter's shape.
    """

    def __init__(self, *, num_classes: int = 1000, width: int = 64, stem_pool: bool = True,
                 zero_init_residual: bool = False):
        super().__init__()
        if width < 1 or num_classes < 1:
            raise ValueError(f"width and num_classes must be >= 1, got {width}, {num_classes}")
        self.width = width
        self.stem_pool = stem_pool
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_channels = width
        for stage, num_blocks in enumerate(RESNET50_BLOCKS):
            planes = width * 2 ** stage
            stride = 1 if stage == 0 else 2
            blocks = [Bottleneck(in_channels, planes, stride=stride)]
            in_channels = planes * Bottleneck.expansion
            blocks += [Bottleneck(in_channels, planes) for _ in range(num_blocks - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_features = in_channels
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's initialisation: Kaiming (fan-out) convs, BN weight 1 and bias 0; with
        `zero_init_residual`, BN weight 0 at the end of each residual branch."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) standardised images -> (B, 32 * width) globally pooled features."""
        x = F.relu(self.bn1(self.conv1(x)))  # (B, w, H/2, W/2)
        if self.stem_pool:
            x = F.max_pool2d(x, 3, stride=2, padding=1)  # (B, w, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32w, H/32, W/32) or H/16
        return x.mean(dim=(2, 3))  # (B, 32w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # (B, num_classes)


def load_imagenet_weights(model: ResNet50, path: str) -> None:
    """Load torchvision's ImageNet `resnet50` checkpoint into `model`, in place.

    Every trunk tensor must be present with its exact shape and nothing else may be in the
    file (a strict load), except that BN step counters (`num_batches_tracked`, absent from
    older torchvision files) keep their current value when missing. The classifier `fc` is
    copied when its shape matches; a different head (the encoder's 2048 -> 257) keeps its own
    initialisation, since ImageNet's classes have no meaning for theta.

    Args:
        model: a `ResNet50` of width 64 (e.g. `Encoder(...).resnet`).
        path: a file written by `torch.save(state_dict)`, such as torchvision's
            `resnet50-0676ba61.pth` or `resnet50-11ad3fa6.pth` (download it on a machine with
            internet access; this project never downloads anything).
    """
    if not isinstance(model, ResNet50):
        raise TypeError(f"model must be a ResNet50, got {type(model).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no ImageNet checkpoint at {path!r}: save torchvision's resnet50 weights there "
            f"(torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), "
            f"path)) or train from random initialisation")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise ValueError(f"{path!r} is not a state_dict (a dict of tensors)")
    own = model.state_dict()
    head = {key for key in own if key.startswith("fc.")}
    # old torchvision files predate BN's step counter: keep ours when it is absent
    optional = head | {key for key in own if key.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(checkpoint) - optional)
    unexpected = sorted(set(checkpoint) - set(own))
    wrong = sorted(key for key in (set(own) & set(checkpoint)) - head
                   if own[key].shape != checkpoint[key].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path!r} does not match ResNet50(width={model.width}) (ImageNet weights need "
            f"width 64): missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape "
            f"{wrong[:5]} ({len(missing)}, {len(unexpected)}, {len(wrong)} in all)")
    head_fits = all(key in checkpoint and checkpoint[key].shape == own[key].shape for key in head)
    use_file = {key for key in own if key in checkpoint and (key not in head or head_fits)}
    merged = {key: checkpoint[key] if key in use_file else own[key] for key in own}
    model.load_state_dict(merged, strict=True)


# ----------------------------------------------------------------------------- Encoder

def output_scale(*, rotation: float = 0.3, translation: float = 1.0, depth: float = 0.005,
                 albedo: float = 3.0) -> torch.Tensor:
    """The fixed factors applied to the encoder's raw outputs, laid out like theta.

    Returns:
        (257,) float32: 1 for identity, expression and illumination, `albedo` for gamma,
        `rotation` for the three Euler angles, `translation` for tx, ty, `depth` for tz.
    """
    ones = split_theta(torch.ones(1, THETA_DIM))
    pose = torch.tensor([[rotation] * 3 + [translation] * 2 + [depth]])  # (1, 6)
    return join_theta(ones._replace(albedo=albedo * ones.albedo, pose=pose))[0]  # (257,)


class Encoder(nn.Module):
    """E: image I_T -> theta (Sec. 3.1): ResNet-50 trunk, pooled features, linear to 257.

    The last layer starts at zero, so theta = 0 (mean face, frontal, ambient light) until it
    learns; its raw outputs are scaled by `output_scale(...)` (see the module docstring).
    """

    def __init__(self, *, width: int = 64, rotation_scale: float = 0.3,
                 translation_scale: float = 1.0, depth_scale: float = 0.005,
                 albedo_scale: float = 3.0, stem_pool: bool = True,
                 zero_init_residual: bool = False):
        super().__init__()
        self.resnet = ResNet50(num_classes=THETA_DIM, width=width, stem_pool=stem_pool,
                               zero_init_residual=zero_init_residual)
        nn.init.zeros_(self.resnet.fc.weight)
        nn.init.zeros_(self.resnet.fc.bias)
        scale = output_scale(rotation=rotation_scale, translation=translation_scale,
                             depth=depth_scale, albedo=albedo_scale)
        self.register_buffer("scale", scale, persistent=False)  # (257,)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> Theta:
        """
        Args:
            images: (B, 3, H, W) in [0, 1]; H, W >= 32 (the trunk downsamples by 32).
        Returns:
            Theta(id (B, 80), exp (B, 64), albedo (B, 80), sh (B, 27), pose (B, 6)).
        """
        _check_images(images, "images", min_size=32)
        # x = (I - mu_ImageNet) / sigma_ImageNet
        x = (images - self.mean) / self.std  # (B, 3, H, W)
        # theta = s * (W f + b), s the fixed output scale
        theta = self.scale * self.resnet(x)  # (B, 257)
        return split_theta(theta)


# ----------------------------------------------------------------------------- UNet

def conv_block(in_channels: int, out_channels: int, *, dropout: float = 0.0) -> nn.Sequential:
    """(3x3 conv -> BN -> ReLU) x 2, then optional dropout: one UNet level."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1),
              nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
              nn.Conv2d(out_channels, out_channels, 3, padding=1),
              nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """x 2 nearest-neighbour upsampling -> 3x3 conv -> BN -> ReLU (halves the channels)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """S: (I_R, I_T) -> M, the face (1) / outlier (0) probability of each pixel (Fig. 2a).

    The official FOCUS UNet (Ronneberger et al. 2015 with padding and batch norm): channel
    widths `width * (1, 2, 4, 8, 16)`, dropout after the two deepest encoder blocks and
    M = sigmoid(`logit_scale` * logit), the official code's steepened sigmoid (x 5).
    """

    def __init__(self, *, width: int = 64, dropout: float = 0.5, logit_scale: float = 5.0):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        channels = [width * 2 ** level for level in range(UNET_LEVELS)]  # 64 .. 1024
        self.logit_scale = logit_scale
        self.down = nn.ModuleList(
            [conv_block(6, channels[0])]
            + [conv_block(channels[level - 1], channels[level],
                          dropout=dropout if level >= UNET_LEVELS - 2 else 0.0)
               for level in range(1, UNET_LEVELS)])
        self.up = nn.ModuleList(
            [up_block(channels[level], channels[level - 1])
             for level in reversed(range(1, UNET_LEVELS))])
        self.up_conv = nn.ModuleList(
            [conv_block(2 * channels[level - 1], channels[level - 1])
             for level in reversed(range(1, UNET_LEVELS))])
        self.out = nn.Conv2d(channels[0], 1, 1)

    def forward(self, rendered: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            rendered: (B, 3, H, W) I_R, zero outside the rendered face.
            target: (B, 3, H, W) I_T. H and W must be multiples of 16 (four poolings).
        Returns:
            (B, 1, H, W) mask M in (0, 1).
        """
        _check_images(rendered, "rendered", min_size=16)
        _check_images(target, "target", min_size=16)
        B, _, H, W = target.shape
        if rendered.shape != target.shape:
            raise ValueError(f"rendered {tuple(rendered.shape)} and target "
                             f"{tuple(target.shape)} must have the same shape")
        if H % 16 or W % 16:
            raise ValueError(f"UNet needs H and W divisible by 16 (four 2x2 poolings), "
                             f"got {H} x {W}; crop or resize the images")
        x = torch.cat([rendered, target], dim=1)  # (B, 6, H, W)
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else F.max_pool2d(x, 2))  # (B, 64 * 2^l, H/2^l, W/2^l)
            skips.append(x)
        skips.pop()
        for up, conv in zip(self.up, self.up_conv):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))  # (B, 64 * 2^l, H/2^l, W/2^l)
        # M = sigmoid(5 * logit)
        return torch.sigmoid(self.logit_scale * self.out(x))  # (B, 1, H, W)


# ----------------------------------------------------------------------------- autoencoder R

class AutoencoderOutput(NamedTuple):
    theta: Theta  # id (B, 80), exp (B, 64), albedo (B, 80), sh (B, 27), pose (B, 6)
    vertices: torch.Tensor  # (B, V, 3) model space, mm
    albedo: torch.Tensor  # (B, V, 3) per-vertex reflectance
    image: torch.Tensor  # (B, 3, H, W) I_R, zero outside the face
    region: torch.Tensor  # (B, 1, H, W) rendered face region S_R in {0, 1}, no gradient
    landmarks: torch.Tensor  # (B, 68, 2) lm_R, pixels (x right, y down)


class FaceAutoencoder(nn.Module):
    """R: image I_T -> theta -> face model -> renderer -> I_R (Sec. 3.1, Fig. 2a).

    Gradients of any loss on the outputs reach the encoder through the renderer's
    barycentric interpolation (inside covered pixels) and the projected landmarks.
    The face model is a submodule: its buffers move with `.to(device)` and are saved in
    this module's `state_dict`.
    """

    def __init__(self, encoder: Encoder, face_model: MorphableModel):
        super().__init__()
        self.encoder = encoder
        self.face_model = face_model
        self._adjacency: Optional[Adjacency] = None  # the mesh's vertex-face incidence

    def adjacency(self) -> Adjacency:
        """`renderer.vertex_adjacency` of the face model, built once per device."""
        triangles = self.face_model.triangles
        if self._adjacency is None or self._adjacency.vertex_face.device != triangles.device:
            self._adjacency = vertex_adjacency(triangles, self.face_model.num_vertices)
        return self._adjacency

    def forward(self, images: torch.Tensor) -> AutoencoderOutput:
        """
        Args:
            images: (B, 3, H, W) target images I_T in [0, 1].
        Returns:
            AutoencoderOutput; images are rendered at the input's H x W.
        """
        _check_images(images, "images", min_size=32)
        _, _, H, W = images.shape
        return self.decode(self.encoder(images), height=H, width=W)

    def decode(self, theta: Theta, *, height: int, width: int) -> AutoencoderOutput:
        """The decoder alone: theta -> face model -> renderer, at height x width (`decode`)."""
        return decode(theta, self.face_model, height=height, width=width,
                      adjacency=self.adjacency())


def decode(theta: Theta, face_model: MorphableModel, *, height: int, width: int,
           adjacency: Optional[Adjacency] = None) -> AutoencoderOutput:
    """I_R = R(theta): theta -> face model -> renderer, at height x width (Sec. 3.1).

    The one theta-to-render path: R's decoder and per-image fitting (fit.py) both use it.
    `adjacency` is `renderer.vertex_adjacency` of the face model (the renderer builds it when
    None).
    """
    # P = mu_shape + U_id alpha_id + U_exp alpha_exp
    vertices = face_model.vertices(theta.id, theta.exp)  # (B, V, 3)
    # T = mu_albedo + U_albedo gamma
    albedo = face_model.albedo(theta.albedo)  # (B, V, 3)
    rendered = render(vertices, albedo, theta.sh, theta.pose, face_model.triangles,
                      face_model.landmarks, height=height, width=width, adjacency=adjacency)
    return AutoencoderOutput(theta, vertices, albedo, rendered.image, rendered.region,
                             rendered.landmarks)


def oracle_theta(theta: torch.Tensor, *, noise: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> Theta:
    """The oracle R's theta: each face's own parameters (B, 257), with Gaussian noise of `noise`
    standard deviations on identity, expression and albedo (pose and light stay exact).

    Not in the paper: decoded by `decode`, it is an R whose misfit can be set, which shows how
    good R must be for the segmenter to learn outliers. Coefficients are in std units (prior
    N(0, 1)), so noise 1 moves a face as far as a fresh draw of the prior does.
    """
    if noise < 0:
        raise ValueError(f"oracle noise must be >= 0 standard deviations, got {noise}")
    parts = split_theta(theta)
    if noise == 0:
        return parts
    # alpha' = alpha + sigma z, gamma' = gamma + sigma z, z ~ N(0, 1), on CPU for one stream
    jitter = lambda part: part + noise * torch.randn(
        part.shape, generator=generator, dtype=part.dtype).to(part.device)  # (B, n)
    return parts._replace(id=jitter(parts.id), exp=jitter(parts.exp),
                          albedo=jitter(parts.albedo))


def oracle_render(autoencoder: "FaceAutoencoder", theta: torch.Tensor, *, noise: float, seed: int,
                  height: int, width: int) -> AutoencoderOutput:
    """The oracle R's render of faces whose true theta (B, 257) is known: `oracle_theta` with
    its noise drawn from a generator seeded `seed`, decoded without gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return autoencoder.decode(oracle_theta(theta, noise=noise, generator=generator),
                                  height=height, width=width)


class Reconstruction(NamedTuple):
    vertices: torch.Tensor  # (B, V, 3) model space, mm
    image: torch.Tensor  # (B, 3, H, W) rendered face I_R, zero outside it
    mask: torch.Tensor  # (B, 1, H, W) face mask, zero outside the rendered region


def reconstruct(images: torch.Tensor, autoencoder: FaceAutoencoder,
                segmenter: Optional[UNet] = None) -> Reconstruction:
    """Inference (Fig. 2b): the 3D face and the face mask of each image, without gradients.

    The networks run in evaluation mode (BN running statistics, no dropout); their previous
    train/eval modes are restored afterwards.

    Args:
        images: (B, 3, H, W) in [0, 1]; H, W multiples of 16 when a segmenter is given.
        autoencoder: the trained R.
        segmenter: the trained S, or None.
    Returns:
        Reconstruction(vertices, image, mask) with mask = S_R * S(I_R, I_T) given a
        segmenter (as the official code masks its loss), else the rendered region S_R.
    """
    with torch.no_grad(), eval_mode(autoencoder, segmenter):
        out = autoencoder(images)
        mask = out.region  # (B, 1, H, W)
        if segmenter is not None:
            # M = S_R * S(I_R, I_T)
            mask = out.region * segmenter(out.image, images)  # (B, 1, H, W)
    return Reconstruction(out.vertices, out.image, mask)


def apply_misfit_prior(vertices: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """P_mf = P - E_MP (Sec. 3.4, Eq. 11): (B, V, 3) predicted shapes, (V, 3) prior -> (B, V, 3).

    E_MP is the mean misfit of R_syn on synthetic faces (`train.misfit_prior`)."""
    if vertices.dim() != 3 or vertices.shape[1:] != prior.shape:
        raise ValueError(f"vertices (B, V, 3) and prior (V, 3) must agree, got "
                         f"{tuple(vertices.shape)} and {tuple(prior.shape)}")
    return vertices - prior.to(vertices)


@contextlib.contextmanager
def eval_mode(*modules: Optional[nn.Module]):
    """Switch modules (None allowed) to eval mode inside the block, then restore every flag."""
    saved = [(m, m.training) for module in modules if module is not None
             for m in module.modules()]
    for module, _ in saved:
        module.train(False)
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def _check_images(images: torch.Tensor, name: str, *, min_size: int) -> None:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor, got {shape}")
    if images.shape[0] < 1 or min(images.shape[2:]) < min_size:
        raise ValueError(f"{name} must have B >= 1 and H, W >= {min_size}, "
                         f"got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got {images.dtype}")
