import pytest

from dllava.training.callbacks import gumbel_tau


def test_tau_decays_exponentially_from_start_to_end():
    taus = [gumbel_tau(step, 100, 1.0, 0.1) for step in range(101)]
    assert taus[0] == 1.0 and taus[100] == pytest.approx(0.1)
    assert taus[50] == pytest.approx(0.1**0.5)
    assert all(a > b for a, b in zip(taus, taus[1:]))
    assert gumbel_tau(250, 100, 1.0, 0.1) == pytest.approx(0.1)  # held at the end
