"""Tests for bfm.py: the theta layout, the landmark tables and the linear model (on the toy
model of toy_face.py, the one model that needs no file)."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import bfm
import toy_face


@pytest.fixture(scope="module")
def toy():
    return toy_face.toy_face_model(64)


@pytest.fixture(scope="module")
def toy64(toy):
    return copy.deepcopy(toy).double()


@pytest.fixture(scope="module")
def small():
    """A coarse toy model (400-odd vertices): quick to build again and to check against."""
    return toy_face.toy_face_model(20)


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


# ----------------------------------------------------------------------------- the model

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


@given(seed=st.integers(0, 2**16))
@settings(max_examples=10, deadline=None)
def test_vertices_of_a_subset_are_those_rows(toy64, seed):
    # the landmark stage of fitting computes the 68 landmark vertices alone
    g = torch.Generator().manual_seed(seed)
    id_coeff, exp_coeff = torch.randn(3, 80, generator=g), torch.randn(3, 64, generator=g)
    id_coeff, exp_coeff = id_coeff.double(), exp_coeff.double()
    indices = torch.randint(0, toy64.num_vertices, (68,), generator=g)
    full = toy64.vertices(id_coeff, exp_coeff)  # (3, V, 3)
    subset = toy64.vertices(id_coeff, exp_coeff, indices=indices)  # (3, 68, 3)
    assert subset.shape == (3, 68, 3)
    torch.testing.assert_close(subset, full[:, indices], rtol=0, atol=1e-9)


def test_coefficient_shape_errors(toy):
    with pytest.raises(ValueError, match="id_coeff"):
        toy.vertices(torch.zeros(2, 79), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="exp_coeff"):
        toy.vertices(torch.zeros(2, 80), torch.zeros(3, 64))
    with pytest.raises(ValueError, match="albedo_coeff"):
        toy.albedo(torch.zeros(80))


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
