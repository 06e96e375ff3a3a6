import math

import pytest
import torch

from anomalib_cflow_plus.condition import positional_encoding_2d


def test_shape_and_known_values():
    encoding = positional_encoding_2d(8, height=3, width=5)
    assert encoding.shape == (8, 3, 5)
    # half = 4, frequencies 1 and 10000**(-1/2) = 0.01
    row, col = 2, 4
    assert encoding[0, row, col].item() == pytest.approx(math.sin(col))
    assert encoding[1, row, col].item() == pytest.approx(math.cos(col))
    assert encoding[2, row, col].item() == pytest.approx(math.sin(col * 0.01))
    assert encoding[3, row, col].item() == pytest.approx(math.cos(col * 0.01))
    assert encoding[4, row, col].item() == pytest.approx(math.sin(row))
    assert encoding[5, row, col].item() == pytest.approx(math.cos(row))
    assert encoding[6, row, col].item() == pytest.approx(math.sin(row * 0.01))


def test_columns_vary_along_width_only():
    encoding = positional_encoding_2d(16, height=4, width=6)
    torch.testing.assert_close(encoding[:8, 0], encoding[:8, 3])
    torch.testing.assert_close(encoding[8:, :, 0], encoding[8:, :, 5])
    assert not torch.allclose(encoding[:8, :, 0], encoding[:8, :, 1])
    positions = encoding.flatten(1).T
    assert torch.cdist(positions, positions).fill_diagonal_(1.0).min() > 1e-3  # every position is distinct


@pytest.mark.parametrize("bad", [0, 6, 130, -4])
def test_rejects_dimensions_not_multiple_of_four(bad):
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(bad, 2, 2)
