"""NumPyro's jitted ``svi.update`` on a batch sharded over two host devices
(``ppl_score.jax.distributed.shard_batch`` over ``data_mesh()``, the SVI state
``replicate``-d) equals the unsharded run: ``ScoreMatching`` with a deterministic objective
(``esm``, optax) and a random one (``ssm_vr``: a latent site, Gaussian projections, the same
keys, ``numpyro.optim``), and ``WAE`` whose Stein estimator couples the whole batch.

One subprocess per module (``tests/helpers/jax_distributed.py``, marker ``distributed``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("jax")
pytest.importorskip("numpyro")
pytest.importorskip("optax")

from tests.helpers.jax_distributed import DEVICES, run  # noqa: E402

RTOL = 1e-6
CASES = ["esm", "ssm_vr", "wae_stein"]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def two_devices():
    """Every number of the two-device NumPyro scenario, from one subprocess."""
    return run("numpyro")


def test_two_host_devices_in_float64(two_devices):
    assert two_devices["devices"] == DEVICES
    assert two_devices["x64"]


@pytest.mark.parametrize("case", CASES)
def test_svi_update_on_a_sharded_batch_equals_the_unsharded_run(two_devices, case):
    r = two_devices[case]
    assert r["finite"]
    assert r["moved"] > 1e-3  # the steps did something
    assert r["params_rel_diff"] < RTOL
    assert r["loss_rel_diff"] < RTOL


@pytest.mark.parametrize("case", CASES)
def test_parameters_stay_replicated(two_devices, case):
    assert two_devices[case]["params_replicated"]


def test_the_random_run_depends_on_the_key_not_on_the_sharding(two_devices):
    """``ssm_vr``: another key gives other parameters (the guide's draws and the projections
    matter), the same key the same parameters however the batch is laid out. (The WAE case
    is deterministic: a ``Delta`` encoder and the Stein estimator draw nothing the loss uses.)"""
    assert two_devices["ssm_vr"]["other_key_rel_diff"] > 1e-3
