r"""Data parallelism with JAX sharding: what the losses need beyond ``jit`` and ``shard_map``.

Two ways to spread a batch over devices (docs page *Distributed training with JAX*):

- **sharding under** ``jit`` **(the recipe)**: put the batch on a ``NamedSharding`` over a data
  axis (:func:`data_mesh`, :func:`shard_batch`), the parameters and optimizer state
  replicated (:func:`replicate`), and run the jitted update unchanged (NumPyro's
  ``svi.update``, an optax step on ``score_matching_loss``). The compiler partitions the
  computation and inserts the collectives; the result is that of the unsharded run (up to
  the order of floating-point sums), random draws included, since a key's draws do not depend
  on how the arrays are laid out.
- ``jax.shard_map`` **for custom loops**: each device runs the loss on its own rows
  :math:`x_r` with its own key (:func:`rank_key`), and the gradients are averaged
  (:func:`all_reduce_gradients`). Here two things are not per-datum:

  - **randomness** (projections, noise, particles): every device must draw its own, or all
    repeat the same draws and their average has the variance of one device's.
    :func:`rank_key` folds the device's index on the axis into one shared key.
  - **batch-global terms** (WAE's MMD between codes and prior draws, kernel score estimators
    over particles, the aggregate posterior's score): they couple the rows of all devices, and
    a device that evaluates them on its own rows computes another quantity.
    :func:`gather_rows` concatenates an array over the axis, differentiably, so each device
    evaluates the term on the whole batch; with :func:`all_reduce_gradients`'s average the
    parameter gradient is exactly that of the single-device term.

Outside ``shard_map`` (the axis name not bound) every function is the single-device identity
(:func:`rank_key` is device 0's key), so the same code runs on one device. Mirrors
``ppl_score.torch.distributed``, with a mesh axis name (``axis_name``) where torch takes a
process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .validate import check_key

__all__ = [
    "all_reduce_gradients",
    "data_mesh",
    "gather_rows",
    "is_distributed",
    "rank_key",
    "replicate",
    "shard_batch",
    "world",
]

# a pytree of arrays (a batch, parameters, gradients, an optimizer or SVI state)
PyTree = Any


def _check_axis_name(axis_name: Any) -> str:
    if not isinstance(axis_name, str):
        raise TypeError(f"argument 'axis_name' must be a str (a mesh axis name), got {type(axis_name).__name__}")
    if not axis_name:
        raise ValueError("argument 'axis_name' must be a non-empty str")
    return axis_name


def _check_mesh(mesh: Any, axis_name: str | None = None) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"argument 'mesh' must be a jax.sharding.Mesh (see data_mesh), got {type(mesh).__name__}")
    if axis_name is not None and axis_name not in mesh.axis_names:
        raise ValueError(
            f"argument 'axis_name' {axis_name!r} is not an axis of the mesh, whose axes are {mesh.axis_names}"
        )
    return mesh


def _check_leaves(name: str, tree: PyTree, scalars: bool = False) -> None:
    kinds = (jax.Array, np.ndarray, np.generic) + ((bool, int, float, complex) if scalars else ())
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, kinds):
            raise TypeError(
                f"argument {name!r} must be an array or a pytree of arrays (jax.Array or numpy), "
                f"got a leaf of type {type(leaf).__name__}"
            )


def _bound_size(axis_name: str) -> int | None:
    """The size of ``axis_name`` when it is bound (inside ``shard_map``, or ``vmap`` /
    ``pmap`` with that ``axis_name``), else ``None``."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:  # an unbound axis name
        return None


def _varying(a: Any) -> frozenset:
    """The mesh axes over which ``a`` is typed as varying inside ``shard_map`` (empty when the
    replication check is off, or outside ``shard_map``)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # earlier releases


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = "data") -> Mesh:
    """A one-dimensional ``Mesh`` over ``devices`` with the data axis ``axis_name``.

    Its axis type is automatic (``AxisType.Auto``): under ``jit`` the compiler propagates the
    shardings of the inputs, so an update written for one device (``svi.update``) runs
    unchanged on a sharded batch.

    Args:
        devices: the devices, in order (default: ``jax.devices()``, every device of the
            default backend).
        axis_name: the name of the data axis.

    Raises:
        TypeError: ``devices`` is not a sequence of ``jax.Device``, or ``axis_name`` not a str.
        ValueError: ``devices`` is empty or repeats a device.
    """
    axis_name = _check_axis_name(axis_name)
    if devices is None:
        devices = jax.devices()
    if isinstance(devices, (str, bytes)) or not isinstance(devices, (Sequence, np.ndarray)):
        raise TypeError(f"argument 'devices' must be a sequence of jax.Device, got {type(devices).__name__}")
    devices = list(np.asarray(devices, dtype=object).reshape(-1))
    bad = [type(d).__name__ for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise TypeError(f"argument 'devices' must be a sequence of jax.Device, got an element of type {bad[0]}")
    if not devices:
        raise ValueError("argument 'devices' must name at least one device, got an empty sequence")
    if len(set(devices)) != len(devices):
        raise ValueError(f"argument 'devices' repeats a device: {devices}")
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:  # releases without axis types: every axis is automatic
        return Mesh(np.asarray(devices, dtype=object), (axis_name,))
    return Mesh(np.asarray(devices, dtype=object), (axis_name,), axis_types=(axis_type.Auto,))


def shard_batch(x: PyTree, mesh: Mesh, axis_name: str = "data") -> PyTree:
    """``x`` (an array or a pytree of arrays) placed with its leading dim split over the mesh
    axis ``axis_name`` (``NamedSharding(mesh, PartitionSpec(axis_name))``) and replicated over
    the mesh's other axes: device ``r`` of ``D`` holds the rows from ``r B/D`` to ``(r+1) B/D - 1``.

    Raises:
        TypeError: ``mesh`` is not a ``Mesh``, a leaf of ``x`` not an array, or ``axis_name``
            not a str.
        ValueError: ``axis_name`` is not an axis of ``mesh``, a leaf is 0-d, or a leaf's
            leading dim does not divide evenly by the axis size (pad or drop rows first).
    """
    axis_name = _check_axis_name(axis_name)
    mesh = _check_mesh(mesh, axis_name)
    size = mesh.shape[axis_name]
    for path, leaf in jax.tree_util.tree_leaves_with_path(x):
        where = f" (leaf {jax.tree_util.keystr(path)})" if path else ""
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"argument 'x' must be an array or a pytree of arrays (jax.Array or numpy), "
                f"got {type(leaf).__name__}{where}"
            )
        if leaf.ndim == 0:
            raise ValueError(f"argument 'x' must have a leading batch dim to shard, got a 0-d array{where}")
        if leaf.shape[0] % size:
            raise ValueError(
                f"argument 'x': the leading dim {leaf.shape[0]}{where} does not divide evenly over the "
                f"{size} devices of mesh axis {axis_name!r}; pad or drop rows to a multiple of {size}"
            )
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axis_name)))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` (parameters, an optimizer or SVI state) with a full copy on every device of
    ``mesh`` (``NamedSharding(mesh, PartitionSpec())``).

    Raises:
        TypeError: ``mesh`` is not a ``Mesh``, or a leaf of ``tree`` is neither an array nor a
            Python number.
    """
    mesh = _check_mesh(mesh)
    _check_leaves("tree", tree, scalars=True)
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def is_distributed(axis_name: str = "data") -> bool:
    """Whether ``axis_name`` is bound here: inside ``shard_map`` over a mesh with that axis
    (or ``vmap`` / ``pmap`` with that ``axis_name``), of any size, one included.

    Raises:
        TypeError: ``axis_name`` is not a str.
    """
    return _bound_size(_check_axis_name(axis_name)) is not None


def world(axis_name: str = "data") -> tuple[jax.Array | int, int]:
    """``(index, size)`` of this device on the axis ``axis_name``: ``jax.lax.axis_index``
    (a traced int) and ``jax.lax.axis_size`` (a Python int) inside ``shard_map``; ``(0, 1)``
    where the axis is not bound.

    Raises:
        TypeError: ``axis_name`` is not a str.
    """
    axis_name = _check_axis_name(axis_name)
    size = _bound_size(axis_name)
    if size is None:
        return 0, 1
    return jax.lax.axis_index(axis_name), size


def rank_key(key: jax.Array, axis_name: str = "data") -> jax.Array:
    """This device's PRNG key: ``jax.random.fold_in(key, r)`` with ``r`` its index on
    ``axis_name`` (``jax.lax.axis_index``).

    Pass it as ``key=`` to the losses and samplers inside ``shard_map`` so each device draws
    its own projections, noise and particles; the same ``key`` on every device gives
    different, reproducible streams. Where the axis is not bound it is ``fold_in(key, 0)``,
    device 0's key, so a one-device run draws what device 0 of a sharded run draws.

    Args:
        key: one PRNG key shared by every device (``jax.random.key(seed)`` or
            ``jax.random.PRNGKey(seed)``).
        axis_name: the mesh axis whose index is folded in.

    Raises:
        TypeError: ``key`` is not a PRNG key, or ``axis_name`` not a str.
        ValueError: ``key`` is a batch of keys.
    """
    key = check_key(key)
    rank, _ = world(axis_name)
    return jax.random.fold_in(key, rank)


def gather_rows(x: jax.Array, axis_name: str = "data") -> jax.Array:
    """``x [n, ...]`` of every device concatenated along dim 0 in axis order, ``[D n, ...]``
    (``jax.lax.all_gather(x, axis_name, tiled=True)``), differentiable.

    Use it inside ``shard_map`` for a batch-global term (one that couples the rows of all
    devices) so each device evaluates it on the whole batch. Its transpose sends each
    device the gradient of its own rows summed over the ``D`` devices' identical copies,
    ``D`` times the gradient of the term; :func:`all_reduce_gradients` with ``op="mean"``
    divides by ``D`` again, so the parameter gradient is that of the single-device term.
    Every device holds the same number of rows (``shard_map`` splits evenly). Where the axis
    is not bound it returns ``x``.

    Raises:
        TypeError: ``x`` is not an array, or ``axis_name`` not a str.
        ValueError: ``x`` is 0-d.
    """
    axis_name = _check_axis_name(axis_name)
    if not isinstance(x, (jax.Array, np.ndarray)):
        raise TypeError(f"argument 'x' must be a jax.Array or numpy array, got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError("argument 'x' must have a leading batch dim to gather over, got a 0-d array")
    if _bound_size(axis_name) is None:
        return x
    return jax.lax.all_gather(x, axis_name, tiled=True)


def all_reduce_gradients(grads: PyTree, axis_name: str = "data", op: str = "mean") -> PyTree:
    r"""The mean (``op="mean"``) or sum (``"sum"``) over the devices of ``axis_name`` of each
    device's gradient, inside ``shard_map``.

    ``grads`` must be ``jax.grad`` of this device's own loss :math:`L_r` (on its rows
    :math:`x_r`, with its key :math:`k_r`) with respect to the parameters. The result is, on
    every device,

    .. math::

        \bar g = \frac{1}{D} \sum_{r=0}^{D-1} \nabla_\theta L_r(\theta; x_r, k_r)
        \quad(\text{mean}), \qquad \sum_{r=0}^{D-1} \nabla_\theta L_r \quad(\text{sum}),

    so for a loss that is a mean over the ``B/D`` rows of each device the mean is the gradient
    of the loss on the whole batch of ``B`` rows (the loop's unsharded counterpart).

    Either setting of ``shard_map``'s ``check_vma`` works. With it on (the default), JAX's
    autodiff already sums over the devices the gradient of a replicated (unvarying) parameter,
    so a plain ``jax.lax.pmean`` of such a gradient returns the *sum*; this function divides
    it by ``D`` instead, and all-reduces only the leaves that are still per-device (varying).
    Do not call it on the gradient of an already reduced loss (``jax.lax.pmean(loss)``
    differentiated): that gradient is already the mean. Where the axis is not bound it
    returns ``grads``. Leaves that are not floating arrays (integer counters) are returned
    unchanged.

    Args:
        grads: a pytree of gradients (``jax.grad`` of the device's loss).
        axis_name: the data axis.
        op: ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: ``axis_name`` is not a str, or a leaf of ``grads`` not an array.
        ValueError: ``op`` is not ``"mean"`` or ``"sum"``.
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"argument 'op' must be 'mean' or 'sum', got {op!r}")
    axis_name = _check_axis_name(axis_name)
    _check_leaves("grads", grads)
    size = _bound_size(axis_name)
    if size is None:
        return grads
    # with check_vma on, the axis index is typed varying; with it off, nothing is
    vma = axis_name in _varying(jax.lax.axis_index(axis_name))

    def reduce(g):
        if not jnp.issubdtype(g.dtype, jnp.inexact):
            return g
        if vma and axis_name not in _varying(g):
            # autodiff already summed it over the devices (transpose of the implicit pvary)
            return g / size if op == "mean" else g
        return jax.lax.pmean(g, axis_name) if op == "mean" else jax.lax.psum(g, axis_name)

    return jax.tree.map(reduce, grads)
