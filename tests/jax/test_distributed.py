"""``ppl_score.jax.distributed``: data parallelism with JAX sharding.

The two-device checks run once per module in a subprocess with two host CPU devices
(``tests/helpers/jax_distributed.py``, marker ``distributed``): the jitted optax loop on a
``shard_batch``-ed batch equals the unsharded one; the ``shard_map`` loop with
``rank_key`` and ``all_reduce_gradients`` equals the mean over devices of per-device
gradients computed by hand, with either ``check_vma``; the devices' keys and draws differ;
``gather_rows`` is the concatenation and makes a batch-global term's gradient exact. The
one-device and argument checks run in this process.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from ppl_score.jax.distributed import (  # noqa: E402
    all_reduce_gradients,
    data_mesh,
    gather_rows,
    is_distributed,
    rank_key,
    replicate,
    shard_batch,
    world,
)
from tests.helpers.jax_distributed import DEVICES, run  # noqa: E402

RTOL = 1e-6


@pytest.fixture(scope="module")
def two_devices():
    """Every number of the two-device scenario, from one subprocess."""
    return run("jax")


# ---------------------------------------------------------------------------------------
# Two devices (subprocess)
# ---------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_host_devices_in_float64(two_devices):
    assert two_devices["devices"] == DEVICES
    assert two_devices["x64"]
    assert two_devices["outside"] == [False, [0, 1]]


@pytest.mark.distributed
def test_shard_batch_splits_the_leading_dim_and_replicate_copies(two_devices):
    r = two_devices
    assert r["shard_spec"] == "P('data',)"
    assert r["shard_shapes"] == [[4, 2], [4, 2]]
    assert r["shard_rows"] == [[0, 4], [4, 8]]  # device r holds rows r B/D .. (r+1) B/D - 1
    assert r["tree_shapes"] == [[4], [4]]  # every leaf of a pytree
    assert r["shard_values_equal"]
    assert r["replicated_spec"] == "P()"
    assert r["replicated_shapes"] == [[2, 4], [2, 4]]


@pytest.mark.distributed
def test_shard_batch_rejects_a_batch_not_divisible_by_the_device_count(two_devices):
    kind, message = two_devices["indivisible"]
    assert kind == "ValueError"
    assert "argument 'x'" in message and "7" in message and "2 devices" in message
    kind, message = two_devices["indivisible_tree"]
    assert kind == "ValueError" and "['y']" in message


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["ssm_vr"])
def test_jit_loop_on_a_sharded_batch_equals_the_unsharded_loop(two_devices, method):
    r = two_devices[f"jit_{method}"]
    assert r["moved"] > 1e-2  # the steps did something
    assert r["params_rel_diff"] < RTOL
    assert r["loss_rel_diff"] < RTOL
    assert r["params_spec"] == "P()"  # the parameters stay replicated


@pytest.mark.distributed
@pytest.mark.parametrize("vma", [1, 0])
def test_shard_map_loop_equals_the_hand_computed_mean_of_per_device_gradients(two_devices, vma):
    """Device ``r`` takes ``grad`` on its rows with ``fold_in(key, r)``; the reduced gradient
    (``op="mean"`` and ``"sum"``) and the parameters after the optax steps equal those
    computed by hand, with ``shard_map``'s ``check_vma`` on and off."""
    r = two_devices[f"shard_map_vma{vma}"]
    assert r["moved"] > 1e-2
    assert r["mean_rel_diff"] < RTOL
    assert r["sum_rel_diff"] < RTOL
    assert r["params_rel_diff"] < RTOL


@pytest.mark.distributed
def test_plain_pmean_of_a_replicated_parameters_gradient_is_the_sum_under_check_vma(two_devices):
    """Why ``all_reduce_gradients`` exists (the docs' warning): with ``check_vma`` on, JAX's
    autodiff already sums the gradient of a replicated parameter over the devices, and
    ``lax.pmean`` of it is that sum; with it off, ``lax.pmean`` is the mean."""
    on, off = two_devices["shard_map_vma1"], two_devices["shard_map_vma0"]
    assert on["naive_vs_sum_rel_diff"] < RTOL and on["naive_vs_mean_rel_diff"] > 0.1
    assert off["naive_vs_mean_rel_diff"] < RTOL


@pytest.mark.distributed
def test_rank_keys_differ_per_device_and_are_folded_in(two_devices):
    k = two_devices["keys"]
    assert k["equal_fold_in"] and k["distinct"]
    assert k["draws_distinct"] and k["draws_equal_by_hand"]
    assert k["ranks"] == [0, 1] and k["sizes"] == [2, 2] and k["bound"] == [True, True]
    assert k["outside_equals_device0"]


@pytest.mark.distributed
def test_gather_rows_is_the_concatenation(two_devices):
    assert two_devices["gather_equals_concat"]


@pytest.mark.distributed
@pytest.mark.parametrize("vma", [1, 0])
def test_batch_global_term_is_exact_only_with_gather_rows(two_devices, vma):
    assert two_devices[f"global_gathered_vma{vma}"] < RTOL
    assert two_devices[f"global_local_vma{vma}"] > 1e-2  # per-device evaluation is another quantity


# ---------------------------------------------------------------------------------------
# One device (this process): the helpers are identity-like
# ---------------------------------------------------------------------------------------


def test_outside_shard_map_every_helper_is_the_single_device_identity():
    x = jnp.arange(6.0).reshape(3, 2)
    grads = {"w": jnp.ones(2), "count": jnp.array(3)}
    key = jax.random.PRNGKey(0)
    assert not is_distributed()
    assert world() == (0, 1)
    assert gather_rows(x) is x
    assert all_reduce_gradients(grads) is grads
    np.testing.assert_array_equal(rank_key(key), jax.random.fold_in(key, 0))


def test_on_one_device_the_helpers_are_identity_like():
    mesh = data_mesh(jax.devices()[:1])
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == 1
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
    w = jnp.array([0.5, -1.0])
    key = jax.random.PRNGKey(2)
    xs, ws = shard_batch(x, mesh), replicate(w, mesh)
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ws, w)

    def loss(w, xb, k):
        return jnp.mean((xb @ w) ** 2 * jax.random.uniform(k, (xb.shape[0],)))

    def device(w, xb, k):
        kr = rank_key(k)
        rank, size = world()
        g = all_reduce_gradients(jax.grad(loss)(w, xb, kr))
        per_device = (gather_rows(xb), jax.random.key_data(kr)[None], jnp.reshape(rank, (1,)))
        return g, per_device, jnp.asarray([size, is_distributed()])

    g, (gathered, kd, rank), (size, bound) = jax.jit(
        jax.shard_map(device, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=(P(), P("data"), P()))
    )(ws, xs, key)
    expected_key = jax.random.fold_in(key, 0)
    np.testing.assert_allclose(g, jax.grad(loss)(w, x, expected_key), rtol=1e-12)
    np.testing.assert_array_equal(gathered, x)
    np.testing.assert_array_equal(kd[0], expected_key)
    assert (int(rank[0]), int(size), bool(bound)) == (0, 1, True)


def test_data_mesh_defaults_to_every_device_on_an_automatic_axis():
    mesh = data_mesh(axis_name="batch")
    assert mesh.axis_names == ("batch",)
    assert mesh.devices.size == jax.device_count()
    if hasattr(jax.sharding, "AxisType"):
        assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


KEY = jax.random.PRNGKey(0)
# (argument named in the message, error, call(mesh, x, device))
BAD_CALLS = [
    ("devices", TypeError, lambda m, x, d: data_mesh("cpu")),
    ("devices", TypeError, lambda m, x, d: data_mesh([0, 1])),
    ("devices", ValueError, lambda m, x, d: data_mesh([])),
    ("devices", ValueError, lambda m, x, d: data_mesh([d, d])),
    ("axis_name", TypeError, lambda m, x, d: data_mesh(axis_name=3)),
    ("axis_name", ValueError, lambda m, x, d: data_mesh(axis_name="")),
    ("mesh", TypeError, lambda m, x, d: shard_batch(x, "mesh")),
    ("axis_name", ValueError, lambda m, x, d: shard_batch(x, m, axis_name="model")),
    ("x", TypeError, lambda m, x, d: shard_batch([1.0, 2.0], m)),
    ("x", ValueError, lambda m, x, d: shard_batch(jnp.float64(1.0), m)),
    ("mesh", TypeError, lambda m, x, d: replicate(x, None)),
    ("tree", TypeError, lambda m, x, d: replicate({"a": "b"}, m)),
    ("key", TypeError, lambda m, x, d: rank_key(3)),
    ("key", ValueError, lambda m, x, d: rank_key(jax.random.split(KEY))),
    ("axis_name", TypeError, lambda m, x, d: rank_key(KEY, axis_name=None)),
    ("x", TypeError, lambda m, x, d: gather_rows([1.0, 2.0])),
    ("x", ValueError, lambda m, x, d: gather_rows(jnp.float64(1.0))),
    ("op", ValueError, lambda m, x, d: all_reduce_gradients({"w": x}, op="max")),
    ("grads", TypeError, lambda m, x, d: all_reduce_gradients({"w": "x"})),
    ("axis_name", TypeError, lambda m, x, d: world(axis_name=("data",))),
    ("axis_name", TypeError, lambda m, x, d: is_distributed(1)),
]


@pytest.mark.parametrize("name, error, call", BAD_CALLS, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_CALLS)])
def test_bad_arguments_raise_naming_the_argument(name, error, call):
    mesh = data_mesh(jax.devices()[:1])
    with pytest.raises(error, match=f"'{name}'"):
        call(mesh, jnp.zeros((2, 2)), jax.devices()[0])
