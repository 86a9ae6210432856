"""Tests of focus.py: ResNet-50 layout, Encoder, UNet, FaceAutoencoder and reconstruct."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import focus
from bfm import THETA_SIZES, join_theta
from face_models import load_face_model
from renderer import render


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(build):
    """Build a full-width network without allocating or initialising its weights."""
    with torch.device("meta"):
        return build()


# ----------------------------------------------------------------------------- ResNet-50 layout

def torchvision_resnet50_shapes() -> dict:
    """The state_dict of torchvision.models.resnet50(), written down from its definition:
    stem conv 7x7 (64) + BN; stages of (3, 4, 6, 3) Bottlenecks with planes (64, 128, 256, 512),
    expansion 4, stride on the 3x3 conv (v1.5), a 1x1 conv + BN `downsample` on each
    stage's first block; fc 2048 -> 1000."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    in_c = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for block in range(blocks):
            p = f"layer{stage + 1}.{block}"
            shapes[f"{p}.conv1.weight"] = (planes, in_c, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, in_c, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            in_c = 4 * planes
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def test_resnet50_state_dict_equals_torchvision():
    state = on_meta(focus.ResNet50).state_dict()
    expected = torchvision_resnet50_shapes()
    assert len(state) == 320
    assert list(state) == list(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    spot = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,),
            "layer1.0.downsample.0.weight": (256, 64, 1, 1),
            "layer2.0.conv2.weight": (128, 128, 3, 3),
            "layer3.5.bn3.num_batches_tracked": (),
            "layer4.0.downsample.1.running_mean": (2048,),
            "layer4.2.conv3.weight": (2048, 512, 1, 1), "fc.weight": (1000, 2048)}
    for key, shape in spot.items():
        assert tuple(state[key].shape) == shape, key
    assert "layer1.1.downsample.0.weight" not in state


def test_resnet50_v15_strides_and_parameter_count():
    net = on_meta(focus.ResNet50)
    assert net.layer2[0].conv1.stride == (1, 1) and net.layer2[0].conv2.stride == (2, 2)
    assert net.layer2[0].downsample[0].stride == (2, 2)
    assert num_params(net) == 25_557_032


@pytest.mark.parametrize("width", [4, 8])
def test_resnet50_width_shapes(width):
    net = focus.ResNet50(width=width, num_classes=7).eval()
    assert net.num_features == 32 * width
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ValueError):
        focus.ResNet50(width=0)


@pytest.mark.parametrize("size", [32, 64])
def test_resnet50_without_stem_pool_keeps_maps_twice_as_large(size):
    maps = {}
    nets = {}
    for pool in (True, False):
        torch.manual_seed(0)
        nets[pool] = focus.ResNet50(width=4, num_classes=7, stem_pool=pool).eval()
        nets[pool].layer4.register_forward_hook(
            lambda m, args, out, pool=pool: maps.update({pool: out.shape}))
        assert nets[pool](torch.rand(2, 3, size, size)).shape == (2, 7)
    # stride 32 with the stem's max-pooling, 16 without
    assert maps[True] == (2, 128, size // 32, size // 32)
    assert maps[False] == (2, 128, size // 16, size // 16)
    # the same parameters, so checkpoints (and ImageNet weights) load either way
    assert num_params(nets[True]) == num_params(nets[False])
    state = nets[True].state_dict()
    assert {k: v.shape for k, v in state.items()} == \
        {k: v.shape for k, v in nets[False].state_dict().items()}
    nets[False].load_state_dict(state)
    x = torch.rand(1, 3, size, size)
    assert not torch.allclose(nets[True].features(x), nets[False].features(x))
    assert num_params(on_meta(lambda: focus.ResNet50(stem_pool=False))) == 25_557_032
    encoder = focus.Encoder(width=4, stem_pool=False)
    assert not encoder.resnet.stem_pool and focus.Encoder(width=4).resnet.stem_pool


def test_zero_init_residual_makes_each_identity_block_pass_its_input():
    torch.manual_seed(0)
    net = focus.ResNet50(width=4, num_classes=7, zero_init_residual=True).eval()
    torch.manual_seed(0)
    plain = focus.ResNet50(width=4, num_classes=7).eval()
    blocks = [m for m in net.modules() if isinstance(m, focus.Bottleneck)]
    assert len(blocks) == 16 and all(torch.all(b.bn3.weight == 0) for b in blocks)
    # the convolutions are drawn exactly as without the option
    assert torch.equal(net.layer3[1].conv2.weight, plain.layer3[1].conv2.weight)
    # a block without a downsampling shortcut returns relu(x) = x for x >= 0
    x = torch.rand(2, 16, 8, 8)
    assert torch.equal(net.layer1[1](x), x)
    assert not torch.allclose(plain.layer1[1](x), x)
    # the encoder passes the option on
    assert torch.all(focus.Encoder(width=4, zero_init_residual=True).resnet.layer4[2].bn3.weight == 0)


def test_load_imagenet_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    source = focus.ResNet50(width=4)
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
    path = str(tmp_path / "resnet50.pth")
    torch.save(source.state_dict(), path)
    same = focus.ResNet50(width=4)
    focus.load_imagenet_weights(same, path)
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    head = focus.ResNet50(width=4, num_classes=257)
    fc_before = head.fc.weight.clone()
    focus.load_imagenet_weights(head, path)
    assert torch.equal(head.layer3[2].conv2.weight, source.layer3[2].conv2.weight)
    assert torch.equal(head.fc.weight, fc_before)


def test_load_imagenet_weights_without_step_counters(tmp_path):
    source = focus.ResNet50(width=4).state_dict()
    old = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    path = str(tmp_path / "old.pth")
    torch.save(old, path)
    net = focus.ResNet50(width=4)
    focus.load_imagenet_weights(net, path)
    assert torch.equal(net.conv1.weight, source["conv1.weight"])


def test_load_imagenet_weights_errors(tmp_path):
    net = focus.ResNet50(width=4)
    with pytest.raises(FileNotFoundError, match="ImageNet checkpoint"):
        focus.load_imagenet_weights(net, str(tmp_path / "absent.pth"))
    wrong_width = str(tmp_path / "w8.pth")
    torch.save(focus.ResNet50(width=8).state_dict(), wrong_width)
    with pytest.raises(ValueError, match="wrong shape"):
        focus.load_imagenet_weights(net, wrong_width)
    incomplete = str(tmp_path / "incomplete.pth")
    state = net.state_dict()
    del state["layer2.1.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, incomplete)
    with pytest.raises(ValueError, match="missing.*layer2.1.conv1.weight"):
        focus.load_imagenet_weights(net, incomplete)
    not_state = str(tmp_path / "list.pth")
    torch.save([1, 2], not_state)
    with pytest.raises(ValueError, match="state_dict"):
        focus.load_imagenet_weights(net, not_state)
    with pytest.raises(TypeError):
        focus.load_imagenet_weights(focus.UNet(width=2), not_state)


# ----------------------------------------------------------------------------- parameter counts

def test_parameter_counts():
    resnet = num_params(on_meta(focus.ResNet50))
    encoder = num_params(on_meta(focus.Encoder))
    unet = num_params(on_meta(focus.UNet))
    cpu_encoder = num_params(on_meta(lambda: focus.Encoder(width=16)))
    cpu_unet = num_params(on_meta(lambda: focus.UNet(width=16)))
    print(f"\nResNet-50 (1000-way head) {resnet:,}; Encoder (257 head) {encoder:,}; "
          f"UNet {unet:,}; width 16: Encoder {cpu_encoder:,}, UNet {cpu_unet:,}")
    # Paper (Supp. A.2): 25.6M for R = torchvision's ResNet-50 with its 1000-way head, which
    # the official code keeps; our head is 2048 -> 257, i.e. 2048 * 743 + 743 fewer.
    assert resnet == 25_557_032 and abs(resnet / 25.6e6 - 1) < 0.01
    assert encoder == 25_557_032 - (2048 + 1) * (1000 - 257) == 24_034_625
    # Paper: 34.5M for S. Per level l with channels c_l = 64 * 2^l, a double 3x3 conv+BN
    # block (c_in -> c) has 9 c_in c + 9 c^2 + 6 c parameters (biases and BN affine):
    # encoder 22,852,864; up-convs 6,269,760 (9 * 2c * c + 3c); decoder blocks 9,406,080;
    # output conv 65. Sum 34,528,769, 0.08% from the paper's 34.5M.
    assert unet == 34_528_769 and abs(unet / 34.5e6 - 1) < 0.01
    assert cpu_encoder < encoder / 10 and cpu_unet < unet / 10


def test_unet_layout_is_official():
    net = on_meta(focus.UNet)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 23  # 5 x 2 encoder, 4 up, 4 x 2 decoder, 1 output
    assert convs[0].in_channels == 6 and convs[-1].out_channels == 1
    widths = [block[0].out_channels for block in net.down]
    assert widths == [64, 128, 256, 512, 1024]
    dropouts = [m.p for block in net.down for m in block if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.5, 0.5] and isinstance(net.down[4][-1], torch.nn.Dropout)
    assert isinstance(net.down[3][-1], torch.nn.Dropout)


# ----------------------------------------------------------------------------- Encoder

@settings(max_examples=10)
@given(batch=st.integers(1, 3), height=st.sampled_from([32, 40, 64]),
       width=st.sampled_from([32, 48]))
def test_encoder_zero_init_gives_zero_theta(batch, height, width):
    torch.manual_seed(batch)
    encoder = focus.Encoder(width=4).eval()  # eval: BN accepts a 1 x 1 map at batch 1
    theta = encoder(torch.rand(batch, 3, height, width))
    assert [t.shape for t in theta] == [(batch, n) for n in THETA_SIZES.values()]
    assert all(torch.equal(t, torch.zeros_like(t)) for t in theta)


def test_encoder_output_scale():
    encoder = focus.Encoder(width=4, depth_scale=0.01).eval()
    torch.nn.init.ones_(encoder.resnet.fc.bias)
    theta = encoder(torch.rand(2, 3, 32, 32))
    assert torch.allclose(theta.pose, torch.tensor([0.3, 0.3, 0.3, 1.0, 1.0, 0.01]).expand(2, 6))
    assert torch.allclose(theta.albedo, torch.full((2, 80), 3.0))
    assert torch.allclose(theta.id, torch.ones(2, 80))
    assert torch.allclose(theta.sh, torch.ones(2, 27))
    assert focus.output_scale().shape == (257,)


def test_encoder_normalises_with_imagenet_statistics():
    encoder = focus.Encoder(width=4).eval()
    mean = torch.tensor(focus.IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    captured = {}
    encoder.resnet.conv1.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    encoder(mean)
    assert captured["x"].abs().max() < 1e-6


@pytest.mark.parametrize("bad", [torch.rand(2, 1, 32, 32), torch.rand(3, 32, 32),
                                 torch.rand(2, 3, 16, 16), torch.zeros(2, 3, 32, 32).long(),
                                 torch.rand(0, 3, 32, 32)])
def test_encoder_rejects_bad_images(bad):
    with pytest.raises(ValueError, match="images"):
        focus.Encoder(width=4)(bad)


def test_encoder_overfits_one_batch():
    torch.manual_seed(0)
    encoder = focus.Encoder(width=8)
    images = torch.rand(4, 3, 32, 32)
    target = 0.5 * torch.randn(4, 257) * focus.output_scale()  # (4, 257)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        # relative error of each output, so small-scale outputs (depth) count equally
        loss = ((join_theta(encoder(images)) - target) / focus.output_scale()).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::5]


# ----------------------------------------------------------------------------- UNet

@settings(max_examples=10)
@given(batch=st.integers(1, 2), h=st.integers(1, 3), w=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_unet_output_shape_and_range(batch, h, w, seed):
    torch.manual_seed(seed)
    unet = focus.UNet(width=2).double().eval()
    rendered, target = torch.rand(2, batch, 3, 16 * h, 16 * w, dtype=torch.float64)
    mask = unet(rendered, target)
    assert mask.shape == (batch, 1, 16 * h, 16 * w)
    assert ((mask > 0) & (mask < 1)).all()


@given(h=st.integers(16, 80), w=st.integers(16, 80))
def test_unet_rejects_sizes_not_divisible_by_16(h, w):
    unet = focus.UNet(width=1).eval()
    images = torch.rand(1, 3, h, w)
    if h % 16 or w % 16:
        with pytest.raises(ValueError, match="divisible by 16"):
            unet(images, images)
    else:
        assert unet(images, images).shape == (1, 1, h, w)


def test_unet_rejects_bad_inputs():
    unet = focus.UNet(width=1)
    with pytest.raises(ValueError, match="same shape"):
        unet(torch.rand(1, 3, 32, 32), torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="rendered"):
        unet(torch.rand(1, 4, 32, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError):
        focus.UNet(width=0)


def test_unet_input_order_is_rendered_then_target():
    unet = focus.UNet(width=2).eval()
    captured = {}
    unet.down[0][0].register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    rendered, target = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    unet(rendered, target)
    assert torch.equal(captured["x"][:, :3], rendered) and torch.equal(captured["x"][:, 3:], target)


def test_unet_overfits_one_batch():
    torch.manual_seed(0)
    unet = focus.UNet(width=4)
    rendered = torch.rand(4, 3, 32, 32)
    target, mask = rendered.clone(), torch.ones(4, 1, 32, 32)
    # one flat-coloured square occluder per image: outlier (mask 0) where it covers the face
    for b, (y, x) in enumerate([(2, 5), (10, 12), (16, 3), (6, 18)]):
        target[b, :, y:y + 12, x:x + 12] = torch.rand(3, 1, 1)
        mask[b, :, y:y + 12, x:x + 12] = 0
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy(unet(rendered, target), mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first, losses[::5]


# ----------------------------------------------------------------------------- determinism

def test_cpu_determinism():
    def run():
        torch.manual_seed(123)
        encoder, unet = focus.Encoder(width=4), focus.UNet(width=2)
        torch.nn.init.normal_(encoder.resnet.fc.weight, std=0.01)
        images = torch.rand(2, 3, 32, 32)
        theta = join_theta(encoder(images))  # train mode: batch statistics
        mask = unet(images, images.flip(-1))  # train mode: dropout
        (theta.sum() + mask.sum()).backward()
        return theta, mask, encoder.resnet.conv1.weight.grad, unet.down[0][0].weight.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- autoencoder R

@pytest.fixture(scope="module")
def toy_model():
    return load_face_model("toy")


def test_autoencoder_zero_theta_renders_mean_face(toy_model):
    torch.manual_seed(0)
    autoencoder = focus.FaceAutoencoder(focus.Encoder(width=4), toy_model)
    out = autoencoder(torch.rand(2, 3, 64, 64))
    B, V = 2, toy_model.mean_shape.shape[0]
    assert out.vertices.shape == out.albedo.shape == (B, V, 3)
    assert out.image.shape == (B, 3, 64, 64) and out.region.shape == (B, 1, 64, 64)
    assert out.landmarks.shape == (B, 68, 2)
    assert torch.allclose(out.vertices, toy_model.mean_shape.expand(B, V, 3))
    assert torch.allclose(out.albedo, toy_model.mean_albedo.expand(B, V, 3))
    reference = render(toy_model.mean_shape[None], toy_model.mean_albedo[None],
                       torch.zeros(1, 27), torch.zeros(1, 6), toy_model.triangles,
                       toy_model.landmarks, height=64, width=64)
    assert torch.allclose(out.image, reference.image.expand(B, 3, 64, 64), atol=1e-5)
    assert torch.equal(out.region, reference.region.expand(B, 1, 64, 64))
    # the mean face is frontal and centred: a substantial, left-right balanced region
    coverage = out.region.mean().item()
    assert 0.1 < coverage < 0.9
    left, right = out.region[..., :32].sum(), out.region[..., 32:].sum()
    assert abs(left - right) <= 0.1 * (left + right)


def test_autoencoder_pixel_loss_reaches_encoder(toy_model):
    torch.manual_seed(0)
    autoencoder = focus.FaceAutoencoder(focus.Encoder(width=4), toy_model)
    images = torch.rand(2, 3, 64, 64)
    out = autoencoder(images)
    ((out.image - images) ** 2 * out.region).mean().backward()
    head = autoencoder.encoder.resnet.fc
    # the zero head passes no gradient on to the trunk yet, but receives one itself
    assert head.weight.grad.abs().sum() > 0 and torch.isfinite(head.weight.grad).all()
    torch.nn.init.normal_(head.weight, std=1e-3)
    autoencoder.zero_grad()
    out = autoencoder(images)
    ((out.image - images) ** 2 * out.region).mean().backward()
    trunk = autoencoder.encoder.resnet.conv1.weight.grad
    assert trunk.abs().sum() > 0 and torch.isfinite(trunk).all()


def test_autoencoder_rejects_bad_images(toy_model):
    autoencoder = focus.FaceAutoencoder(focus.Encoder(width=4), toy_model)
    with pytest.raises(ValueError, match="images"):
        autoencoder(torch.rand(2, 64, 64))


def test_reconstruct(toy_model):
    torch.manual_seed(0)
    autoencoder = focus.FaceAutoencoder(focus.Encoder(width=4), toy_model)
    segmenter = focus.UNet(width=2)
    images = torch.rand(2, 3, 64, 64)
    plain = focus.reconstruct(images, autoencoder)
    assert plain.vertices.shape == (2, toy_model.mean_shape.shape[0], 3)
    assert plain.image.shape == (2, 3, 64, 64)
    assert not plain.image.requires_grad
    reference = autoencoder.eval()(images)
    assert torch.equal(plain.mask, reference.region)
    autoencoder.train()
    masked = focus.reconstruct(images, autoencoder, segmenter)
    assert autoencoder.training and segmenter.training  # modes restored
    assert masked.mask.shape == (2, 1, 64, 64)
    assert ((masked.mask >= 0) & (masked.mask <= plain.mask)).all()
    again = focus.reconstruct(images, autoencoder, segmenter)
    assert torch.equal(again.mask, masked.mask)  # eval mode: no dropout, running BN stats
    assert (masked.mask[plain.mask == 0] == 0).all()
