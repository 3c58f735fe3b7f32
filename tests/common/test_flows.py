"""The framework-free half of the flows (``ppl_score.common.flows``): the Newton error message."""

from __future__ import annotations


def test_newton_error_names_the_layer_and_a_non_finite_residual():
    from ppl_score.common import flows as _flows

    assert "of layer 1 did not converge" in str(_flows.newton_error(5, 2, 0.1, 1e-6, 1))
    msg = str(_flows.newton_error(5, 2, float("nan"), 1e-6, 0))
    assert "not finite" in msg and "up to nan" not in msg
