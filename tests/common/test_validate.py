"""One validation path, its framework-free half (``ppl_score.common.validate``): the switch
(re-exported by ``ppl_score``) and the argument checks every module shares. Wrong types raise
``TypeError``, wrong values ``ValueError``, one message per rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ppl_score
from ppl_score.common.validate import check_int, check_positive_float, check_real_in, check_sites


def test_set_validation_type():
    with pytest.raises(TypeError, match="enabled"):
        ppl_score.set_validation("no")
    assert ppl_score.is_validation_enabled()


@pytest.mark.parametrize("bad", [1.5, "2", True, None])
def test_check_int_type(bad):
    with pytest.raises(TypeError, match="argument 'n' must be an int"):
        check_int("n", bad)


def test_check_int_value():
    assert check_int("n", np.int64(3)) == 3
    with pytest.raises(ValueError, match=r"argument 'n' must be an int >= 1, got 0"):
        check_int("n", 0)
    with pytest.raises(ValueError, match=r"in \[0, 2\]"):
        check_int("n", 3, low=0, high=2)


def test_check_positive_float():
    assert check_positive_float("lr", 1) == 1.0
    with pytest.raises(TypeError, match="'lr'"):
        check_positive_float("lr", "0.1")
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="'lr' must be a finite number > 0"):
            check_positive_float("lr", bad)


def test_check_real_in():
    assert check_real_in("alpha", 1, 0.0, 1.0) == 1.0
    with pytest.raises(TypeError, match=r"'alpha' must be a real number in \(0, 1\]"):
        check_real_in("alpha", "1", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"'alpha' must be a real number in \(0, 1\], got 0.0"):
        check_real_in("alpha", 0, 0.0, 1.0)
    assert check_real_in("p", 0, 0.0, 1.0, closed_low=True) == 0.0


def test_check_sites_one_rule():
    assert check_sites(None) is None
    assert check_sites("x") == ("x",)
    assert check_sites(["x", "y"]) == ("x", "y")
    with pytest.raises(TypeError, match="must be None, a site name or a list"):
        check_sites(3)
    with pytest.raises(TypeError, match=r"site names \(strings\)"):
        check_sites(["x", 1])
    with pytest.raises(ValueError, match="names a site twice"):
        check_sites(["x", "x"])
    with pytest.raises(ValueError, match="at least one latent site"):
        check_sites([], "latent")
