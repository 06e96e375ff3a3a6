import math
import pickle

import pytest
import torch
from torch.autograd.functional import jacobian

from anomalib_cflow_plus.condition import grid_condition
from anomalib_cflow_plus.flow import (
    ConditionalAffineCoupling,
    FiberActNorm,
    build_decoder,
    flow_loss,
    grid_log_likelihood,
    log_likelihood,
)


def _randomize(decoder: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialized subnets non-trivial weights so the blocks are not identities."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def test_decoder_is_invertible():
    decoder = build_decoder(channels=12, condition_dim=8, coupling_blocks=4).double()
    _randomize(decoder)
    x, c = torch.randn(64, 12, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)
    z, log_det = decoder(x, c=[c])
    x_back, log_det_rev = decoder(z, c=[c], rev=True)
    assert not torch.allclose(z, x, atol=1e-2)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(log_det_rev, -log_det, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("hidden_ratio", "hidden"), [(0.5, 148), (1.0, 296), (2.0, 592)])
def test_hidden_ratio_scales_the_subnets_hidden_width(hidden_ratio, hidden):
    # 40 channels: a passive half of 20 and P=128, so the paper's width is 2 * (20 + 128) = 296.
    decoder = build_decoder(40, 128, coupling_blocks=2, hidden_ratio=hidden_ratio).double()
    _randomize(decoder)
    for coupling in decoder[1:]:
        assert coupling.subnet.fiber_in.out_features == coupling.subnet.condition_in.out_features == hidden
        assert coupling.subnet.out.in_features == hidden
    fibers, condition = torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 128, dtype=torch.float64)
    z, _ = decoder(fibers, c=[condition])
    restored, _ = decoder(z, c=[condition], rev=True)
    torch.testing.assert_close(restored, fibers, atol=1e-10, rtol=1e-10)


def test_log_det_matches_autograd_jacobian():
    decoder = build_decoder(channels=6, condition_dim=4, coupling_blocks=3).double()
    _randomize(decoder, seed=1)
    x, c = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    _, log_det = decoder(x, c=[c])
    for i in range(x.shape[0]):
        jac = jacobian(lambda row, i=i: decoder(row[None], c=[c[i : i + 1]])[0][0], x[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-8, rtol=1e-8)


def test_permutation_is_an_index_buffer_not_a_matrix():
    block = ConditionalAffineCoupling([(10,)], [(4,)], permutation_seed=3)
    assert block.permutation.shape == (10,)
    assert sorted(block.permutation.tolist()) == list(range(10))
    assert not any(p.shape == (10, 10) for p in block.parameters())


def test_soft_clamp_bounds_the_log_scale():
    block = ConditionalAffineCoupling([(4,)], [(2,)], clamp_alpha=1.9)
    with torch.no_grad():
        block.subnet.out.bias.fill_(1e4)
    _, log_det = block([torch.randn(3, 4)], c=[torch.randn(3, 2)])
    assert torch.all(log_det <= 2 * 1.9 + 1e-5)


def test_actnorm_initializes_only_when_asked():
    actnorm = FiberActNorm([(3,)])
    fibers = torch.randn(500, 3) * torch.tensor([1.0, 5.0, 0.0]) + 7.0
    out, _ = actnorm([fibers])
    torch.testing.assert_close(out[0], fibers)  # untouched before initialize()
    actnorm.initialize(fibers)
    out, _ = actnorm([fibers])
    assert torch.isfinite(out[0]).all()  # the constant channel does not blow up
    torch.testing.assert_close(out[0][:, :2].mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0][:, :2].std(0), torch.ones(2), atol=1e-3, rtol=0)
    assert bool(actnorm.initialized)
    restored = FiberActNorm([(3,)])
    restored.load_state_dict(actnorm.state_dict())
    assert bool(restored.initialized)


def test_log_likelihood_of_standard_normal():
    z = torch.zeros(4, 10)
    expected = -0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_likelihood(z, torch.zeros(4)), torch.full((4,), expected))
    # the log-det adds per dimension
    torch.testing.assert_close(log_likelihood(z, torch.full((4,), 10.0)), torch.full((4,), expected + 1.0))


def test_flow_learns_a_gaussian():
    torch.manual_seed(0)
    mean, scale = torch.tensor([3.0, -2.0, 0.5, 1.0]), torch.tensor([0.2, 2.0, 1.0, 0.5])
    data = torch.randn(4096, 4) * scale + mean
    condition = torch.zeros(4096, 4)
    decoder = build_decoder(channels=4, condition_dim=4, coupling_blocks=4)
    # ActNorm is left uninitialized: the couplings alone must learn the mean and scale
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return flow_loss(log_likelihood(*decoder(data, c=[condition])))

    first = loss().item()
    for step in range(300):
        batch = torch.randint(0, 4096, (256,), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        flow_loss(log_likelihood(*decoder(data[batch], c=[condition[batch]]))).backward()
        optimizer.step()
    last = loss().item()
    assert last < first - 0.5
    # the learned density should be close to the true per-dimension Gaussian log-likelihood
    true_ll = (torch.distributions.Normal(mean, scale).log_prob(data).sum(1) / 4).mean()
    learned_ll = log_likelihood(*decoder(data, c=[condition])).mean()
    assert abs(learned_ll.item() - true_ll.item()) < 0.05


@pytest.mark.parametrize("channels", [2, 7])
def test_odd_and_tiny_channel_counts(channels):
    decoder = build_decoder(channels=channels, condition_dim=4, coupling_blocks=2).double()
    _randomize(decoder)
    x, c = torch.randn(8, channels, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    z, _ = decoder(x, c=[c])
    torch.testing.assert_close(decoder(z, c=[c], rev=True)[0], x, atol=1e-10, rtol=1e-10)


def test_decoder_pickles_and_round_trips():
    # anomalib's torch export pickles the whole model
    decoder = build_decoder(channels=6, condition_dim=4, coupling_blocks=2)
    decoder[0].initialize(torch.randn(32, 6))
    _randomize(decoder, seed=2)
    restored = pickle.loads(pickle.dumps(decoder))
    x, c = torch.randn(3, 6), torch.randn(3, 4)
    torch.testing.assert_close(restored(x, c=[c])[0], decoder(x, c=[c])[0])


def test_grid_condition_gives_the_same_likelihood_as_the_dense_condition():
    decoder = build_decoder(channels=10, condition_dim=8, coupling_blocks=3).double()
    _randomize(decoder, seed=2)
    condition = grid_condition(8, height=3, width=5, dtype=torch.float64)
    fibers = torch.randn(2, 15, 10, dtype=torch.float64)
    z_grid, log_det_grid = decoder(fibers.reshape(2, 3, 5, 10), c=[condition])  # a whole grid: (B, h, w, C)
    dense = condition.dense()  # (15, 8)
    z_dense, log_det_dense = decoder(fibers.reshape(30, 10), c=[dense.repeat(2, 1)])
    torch.testing.assert_close(z_grid.reshape(30, 10), z_dense)
    torch.testing.assert_close(log_det_grid.reshape(30), log_det_dense)
    # fibers picked from the flat batch by index, with an indexed grid condition
    index = torch.tensor([29, 3, 17])
    z_picked, log_det_picked = decoder(fibers.reshape(30, 10)[index], c=[condition.select(index)])
    torch.testing.assert_close(z_picked, z_dense[index])
    torch.testing.assert_close(log_det_picked, log_det_dense[index])


def test_permutation_gradient_is_the_inverse_gather():
    block = ConditionalAffineCoupling([(7,)], [(4,)], permutation_seed=5).double()
    _randomize(block, seed=3)
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: block([x], c=[c])[0][0], (x,))
    assert torch.autograd.gradcheck(lambda x: block([x], c=[c])[1], (x,))


@pytest.mark.parametrize(("channels", "height", "width"), [(10, 3, 5), (41, 4, 2), (2, 1, 1)])
def test_grid_log_likelihood_is_the_decoders_likelihood(channels, height, width):
    # The inference form (one gather per inner permutation, none after the last coupling) scores as the decoder does.
    decoder = build_decoder(channels=channels, condition_dim=8, coupling_blocks=4, seed=3)
    decoder[0].initialize(torch.randn(64, channels))
    _randomize_couplings(decoder, scale=0.1)
    condition = grid_condition(8, height, width)
    fibers = torch.randn(3, height, width, channels)
    expected = log_likelihood(*decoder(fibers.reshape(-1, channels), c=[condition.dense().repeat(3, 1)]))
    with torch.no_grad():
        scored = grid_log_likelihood(decoder, fibers, condition)
    assert scored.shape == (3, height, width)
    assert expected.abs().max() > 1.0  # a decoder far from the identity
    torch.testing.assert_close(scored.reshape(-1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("memory_format", "contiguous"),
    [(torch.channels_last, True), (torch.contiguous_format, False)],  # NHWC memory: a view; NCHW: a strided view
)
def test_grid_log_likelihood_takes_permuted_views_of_features(memory_format, contiguous):
    decoder = build_decoder(channels=6, condition_dim=4, coupling_blocks=2)
    decoder[0].initialize(torch.randn(64, 6))
    _randomize_couplings(decoder, scale=0.3)
    features = torch.randn(2, 6, 3, 4).to(memory_format=memory_format)
    fibers = features.permute(0, 2, 3, 1)  # (B, h, w, C), no copy
    assert fibers.is_contiguous() is contiguous
    assert fibers.data_ptr() == features.data_ptr()
    condition = grid_condition(4, 3, 4)
    copy = fibers.contiguous()
    expected = log_likelihood(*decoder(copy.reshape(-1, 6), c=[condition.dense().repeat(2, 1)])).reshape(2, 3, 4)
    with torch.no_grad():
        scored = grid_log_likelihood(decoder, fibers, condition)
    torch.testing.assert_close(scored, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scored, grid_log_likelihood(decoder, copy, condition), atol=1e-6, rtol=0)
    assert expected.std() > 0.1  # the positions score differently: a mix-up of fibers would show


def _randomize_couplings(decoder: torch.nn.Module, scale: float) -> None:
    """Random subnet weights, the ActNorm left as it is."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if ".subnet." in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
