"""Site handling of ``ScoreMatching``, written once for both front ends (framework-free).

The Pyro and NumPyro ``ScoreMatching`` losses (``ppl_score.pyro``, ``ppl_score.numpyro``)
only translate their PPL's traces into the plain site dictionaries both PPLs share (keys
``type``, ``fn``, ``value``, ``is_observed``, ``infer``, ``mask``, ``scale``,
``cond_indep_stack``) and supply an :class:`ArrayOps` for their array library and a
``rerun`` that re-executes the model. Everything else lives here: which sites are matched,
observed-but-conditioned, latent or prior terms; the unconstrained data blocks and their
offsets; masks and per-datum weights (scale x mask); the dependency analysis; and the
function ``x -> per-datum log joint density`` that the backend objectives consume.

Semantics (the spec, docs page *Spec*, section 3). The matched sites' score is the score of
the model's *joint* log density in the matched values, with unmatched observed sites
conditioned on::

    log p(x_i, rest) = sum_{matched m} log p_m(x_{m,i} | parents)   (+ log|det J| of biject_to)
                     + sum_{sites j whose distribution depends on a matched value}
                           log p_j(value_j | parents, x)

Sites whose distribution does not depend on a matched value add a constant in ``x`` and are
left out (their score in ``x`` is zero). Two routes compute it:

- *fast path*: no site depends on a matched value; each matched site's log density is the
  distribution object the model built for it, evaluated at the perturbed ``x`` in one
  batched call (no model re-execution).
- *joint path*: some site depends on a matched value; the model is re-executed with the
  matched values substituted (``rerun``), so every dependent site's log density is a
  function of ``x``; the perturbed copies the objectives stack (``k``) are one extra batch
  dimension (a plate left of the model's plates in Pyro, a ``vmap`` in NumPyro).

Per-datum structure: plate dimensions of the matched sites index data points and event
dimensions are ``x``. It holds when every dependent site lives in every plate that indexes a
matched data dimension (plates declare conditional independence, so then datum ``i``'s
density involves only datum ``i``). Otherwise (a site couples data points, e.g. a sequence
observed along a plate, or matched sites in different plates) the whole batch is *one*
data point whose ``x`` concatenates every value: still exact (the objectives of the spec,
section 1, are sums over coordinates, so the expectation is unchanged), one datum instead of
``n``.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from . import frontend
from .validate import is_validation_enabled

__all__ = [
    "ArrayOps",
    "Block",
    "Classified",
    "Dependencies",
    "MatchedDensity",
    "broadcast_shapes",
    "classify",
    "combine_masks",
    "site_block",
    "plan",
    "prior_sites",
    "matched_density",
    "masked_log_prob",
    "reduce_to_batch",
    "clean_observed",
]


class ArrayOps(abc.ABC):
    """The array and distribution operations site handling needs, written once over an array
    namespace ``xp`` (``torch`` or ``jax.numpy``, which share these names); a front end
    subclasses it with its namespace, its PPL's ``MaskedDistribution``, ``constraints`` and
    ``biject_to``, and the few operations the two libraries spell differently."""

    xp: Any = None
    masked_type: type = type(None)
    constraints: Any = None
    biject_to: Callable = None

    # ---- spelled differently: each front end defines these ----

    @abc.abstractmethod
    def as_float(self, value: Any) -> Any:
        """The value as a detached floating array (integer data in the default float dtype)."""

    @abc.abstractmethod
    def as_bool(self, mask: Any) -> Any:
        """A mask as a boolean array."""

    @abc.abstractmethod
    def all_finite(self, x: Any) -> bool | None:
        """Whether every entry is finite; None when unknown (a traced array)."""

    @abc.abstractmethod
    def stop_gradient(self, x: Any) -> Any: ...

    @abc.abstractmethod
    def same_scale(self, a: Any, b: Any) -> bool: ...

    @abc.abstractmethod
    def as_array(self, value: Any, like: Any) -> Any:
        """A scale or a boolean mask as an array of ``like``'s dtype (and device)."""

    # ---- the same in both ----

    def unmask(self, fn: Any) -> tuple:
        """``(base distribution, its mask or None)`` of a (possibly masked) distribution."""
        return (fn.base_dist, fn._mask) if isinstance(fn, self.masked_type) else (fn, None)

    def transform(self, support: Any) -> Any:
        """``biject_to(support)``, or None for the real line (possibly with event dims)."""
        c = support
        while isinstance(c, self.constraints.independent):
            c = c.base_constraint
        return None if type(c) is type(self.constraints.real) else self.biject_to(support)

    def broadcast_to(self, x: Any, shape: tuple) -> Any:
        return self.xp.broadcast_to(x, shape)

    def where(self, cond: Any, x: Any, other: float) -> Any:
        return self.xp.where(cond, x, other)

    def concat(self, xs: Sequence[Any]) -> Any:
        """Concatenation along the last axis of ``[n, d_j]`` arrays."""
        return self.xp.concatenate(xs, axis=1)

    def stack_any(self, masks: Sequence[Any]) -> Any:
        """Elementwise ``or`` of equally shaped boolean arrays."""
        return self.xp.stack(masks).any(0)

    def sum(self, x: Any, axes: tuple) -> Any:
        """Sum over ``axes`` keeping them (size 1)."""
        return self.xp.sum(x, axis=axes, keepdims=True)

    def zeros_like(self, x: Any) -> Any:
        return self.xp.zeros_like(x)

    def full_bool(self, shape: tuple, value: bool) -> Any:
        return self.xp.full(shape, value, dtype=self.xp.bool)

    def scale_weights(self, scale: Any, batch: tuple, n: int, like: Any) -> Any | None:
        """Per-datum weights ``[n]`` of a site scale (None for scale 1)."""
        if scale is None or (isinstance(scale, (int, float)) and scale == 1.0):
            return None
        return self.broadcast_to(self.as_array(scale, like), tuple(batch)).reshape((n,))


def broadcast_shapes(*shapes: Sequence[int]) -> tuple | None:
    """NumPy broadcasting of ``shapes``; None where they do not broadcast."""
    out: list = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if len(shape) > len(out):
            out = [1] * (len(shape) - len(out)) + out
        for k, s in enumerate(shape, start=len(out) - len(shape)):
            if s == 1:
                continue
            if out[k] not in (1, s):
                return None
            out[k] = s
    return tuple(out)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------
# Which sites are which
# ---------------------------------------------------------------------------------------


class Classified(NamedTuple):
    """The sample sites of a model trace, in model order."""

    order: tuple  # every sample site
    observed: tuple  # observed, not a factor
    latent: tuple  # not observed
    prior: tuple  # latent sites and factors: the log p(z) of the ELBO part
    matched: tuple  # the observed sites ScoreMatching matches


def classify(nodes: Mapping[str, dict], sites: tuple | None) -> Classified:
    """Sort a model trace's sample sites (a ``name -> site`` mapping) and pick the matched
    ones (every observed site, or those named in ``sites``)."""
    order, observed, latent, prior = [], [], [], []
    for name, site in nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic", False):
            continue  # a Pyro deterministic site is recorded as an observed point mass
        order.append(name)
        if not site["is_observed"]:
            latent.append(name)
            prior.append(name)
        elif site["infer"].get("is_auxiliary", False):  # pyro.factor / numpyro.factor
            prior.append(name)
        else:
            observed.append(name)
    matched = frontend.select_matched(observed, latent, sites)
    return Classified(tuple(order), tuple(observed), tuple(latent), tuple(prior), matched)


def prior_sites(classified: Classified, dependent: Sequence[str]) -> tuple:
    """The sites of ``log p(z)`` in the loss: latent sites and factors, except a factor that
    depends on a matched value (it is part of the matched sites' joint density instead)."""
    return tuple(name for name in classified.prior if name not in dependent)


def check_latent_sites(nodes: Mapping[str, dict], guide_nodes: Mapping[str, dict]) -> None:
    """Every latent site of the model needs a reparameterized guide site (an enumerated
    discrete site gets its own message)."""
    for name, site in nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            if site["fn"].support.is_discrete or site["infer"].get("enumerate"):
                raise frontend.discrete_latent_error(name)
            if guide_nodes.get(name, {}).get("type") != "sample":
                raise frontend.missing_guide_site_error(name)
    for name, site in guide_nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
            if site["fn"].support.is_discrete:
                raise frontend.discrete_latent_error(name)
            raise frontend.nonreparam_guide_site_error(name)


# ---------------------------------------------------------------------------------------
# Matched sites -> unconstrained data blocks
# ---------------------------------------------------------------------------------------


class Block:
    """One matched site: its unconstrained data ``u [*batch, *uevent]``, where it sits in
    the rows ``x`` (``start:stop``), its mask and scale, and its plates."""

    __slots__ = (
        "name",
        "base",
        "transform",
        "mask",
        "u",
        "batch",
        "uevent",
        "start",
        "stop",
        "scale",
        "frames",
        "event_dim",
    )


def combine_masks(ops: ArrayOps, name: str, batch: tuple, *masks: Any) -> Any:
    """The conjunction of a site's masks as a boolean array of its batch shape (None: none).

    Raises:
        ValueError: a mask does not broadcast to the site's batch shape (naming the site).
    """
    out = None
    for m in masks:
        if m is None or m is True:
            continue
        if m is False:
            m = ops.full_bool(tuple(batch), False)
        shape = tuple(getattr(m, "shape", ()))
        if broadcast_shapes(shape, batch) != tuple(batch):
            raise frontend.mask_shape_error(name, shape, batch)
        m = ops.broadcast_to(ops.as_bool(m), tuple(batch))
        out = m if out is None else out & m
    return out


def site_block(ops: ArrayOps, name: str, site: dict) -> Block:
    """The unconstrained data of a matched site (with finite stand-ins at masked entries).

    Raises:
        ValueError: discrete support, a value that does not end with the event shape, a mask
            of the wrong shape, non-finite or out-of-support data (under validation); each
            naming the site.
    """
    fn = site["fn"]
    if fn.support.is_discrete:
        raise frontend.discrete_site_error(name)
    base, fn_mask = ops.unmask(fn)
    value = ops.as_float(site["value"])
    e = fn.event_dim
    vshape, event = tuple(value.shape), tuple(fn.event_shape)
    if len(vshape) < e or vshape[len(vshape) - e :] != event:
        raise frontend.event_shape_error(name, vshape, event)
    batch = broadcast_shapes(vshape[: len(vshape) - e], tuple(fn.batch_shape))
    if batch is None:
        raise frontend.event_shape_error(name, vshape, event)
    if batch != vshape[: len(vshape) - e]:
        value = ops.broadcast_to(value, batch + event)
    blk = Block()
    blk.name, blk.base, blk.batch, blk.scale, blk.event_dim = name, base, batch, site["scale"], e
    blk.frames = tuple(f for f in site["cond_indep_stack"] if f.dim is not None)
    blk.transform = ops.transform(fn.support)
    blk.mask = combine_masks(ops, name, batch, site.get("mask"), fn_mask)
    u = value if blk.transform is None else blk.transform.inv(value)
    if blk.mask is not None:
        # masked entries keep their data (a dependent site sees them as the model does); only
        # non-finite ones (obs_mask allows NaN, or out of the support) get a finite stand-in
        keep = blk.mask.reshape(batch + (1,) * (u.ndim - len(batch)))
        u = ops.where(keep | ops.xp.isfinite(u), u, 0.0)
        value = ops.where(blk.mask.reshape(batch + (1,) * (value.ndim - len(batch))), value, 0.0)
    if is_validation_enabled() and ops.all_finite(u) is False:
        # one host sync in the common (finite) case; tell the two causes apart on failure
        if ops.all_finite(value) is False:
            raise frontend.nonfinite_observed_error(name)
        raise frontend.outside_support_error(name)
    blk.u, blk.uevent = ops.stop_gradient(u), tuple(u.shape[len(batch) :])
    return blk


def unconstrained_log_prob(ops: ArrayOps, blk: Block, u: Any) -> Any:
    """``log p(T(u)) + log|det dT/du|`` of a block's traced distribution, masked."""
    if blk.transform is None:
        lp = blk.base.log_prob(u)
    else:
        y = blk.transform(u)
        lp = blk.base.log_prob(y) + _ladj(blk, u, y)
    if blk.mask is not None:
        lp = ops.where(blk.mask, lp, 0.0)
    return lp


def _ladj(blk: Block, u: Any, y: Any) -> Any:
    """``log|det dT/du|`` summed over the site's event dims: shape ``[k, *batch]``."""
    ladj = blk.transform.log_abs_det_jacobian(u, y)
    keep = u.ndim - len(blk.uevent)
    return ladj.reshape(tuple(ladj.shape[:keep]) + (-1,)).sum(-1) if ladj.ndim > keep else ladj


# ---------------------------------------------------------------------------------------
# Dependencies: which sites join the joint density, and per datum or not
# ---------------------------------------------------------------------------------------


class Dependencies(NamedTuple):
    """The outcome of the dependency analysis."""

    dependent: tuple  # sites (matched or observed) whose distribution depends on a matched value
    per_datum: bool  # plate dims of the matched sites stay data points


def sites_to_check(order: Sequence[str], matched: Sequence[str]) -> list:
    """Sample sites that run after the first matched one (only those can depend on one)."""
    for k, name in enumerate(order):
        if name in matched:
            return list(order[k + 1 :])
    return []


def plan(nodes: Mapping[str, dict], found: Mapping[str, Sequence[str]], blocks: Sequence[Block]) -> Dependencies:
    """Decide the route from the dependencies a front end found.

    Args:
        nodes: the model trace (``name -> site``).
        found: ``site -> matched sites its distribution depends on`` (empty: fast path).
        blocks: the matched sites' blocks.

    Returns:
        The dependent sites and whether the plates of the matched sites index data points.

    Raises:
        ValueError: a latent site's distribution depends on a matched value (its log density
            would count both in the matched sites' joint density and in ``log p(z)``).
    """
    latent = [j for j in found if not nodes[j]["is_observed"]]
    if latent:
        raise frontend.latent_dependency_error({j: found[j] for j in latent})
    dependent = tuple(j for j in nodes if j in found)
    return Dependencies(dependent, _per_datum(nodes, dependent, blocks))


def _per_datum(nodes: Mapping[str, dict], dependent: Sequence[str], blocks: Sequence[Block]) -> bool:
    batch = blocks[0].batch
    if any(blk.batch != batch for blk in blocks):
        return False
    if not dependent:
        return True
    # every data dim (size > 1) must be a plate shared by all matched and dependent sites
    sites_frames = [blk.frames for blk in blocks] + [
        tuple(f for f in nodes[j]["cond_indep_stack"] if f.dim is not None) for j in dependent
    ]
    for pos, size in enumerate(batch):
        if size == 1:
            continue
        dim = pos - len(batch)
        names = [{f.name for f in frames if f.dim == dim} for frames in sites_frames]
        if not names[0] or not set.intersection(*names):
            return False
    return True


# ---------------------------------------------------------------------------------------
# The function the backend objectives take
# ---------------------------------------------------------------------------------------


class MatchedDensity(NamedTuple):
    """``fn(x[k * n, D]) -> [k * n]``: the joint per-datum log density of the matched sites
    at unconstrained rows ``x`` (the backends stack ``k`` perturbed copies of the batch);
    ``x [n, D]`` the data; ``weight [n]`` (scale x mask) or None."""

    fn: Callable
    x: Any
    weight: Any
    per_datum: bool
    dependent: tuple


def reduce_to_batch(ops: ArrayOps, lp: Any, k: int, batch: tuple) -> Any:
    """Sum a site's log density ``[k, *site_batch]`` to ``[k * prod(batch)]``: dims left of
    ``batch`` and dims where ``batch`` has size 1 are summed (nested plates), the rest kept."""
    shape = tuple(lp.shape)
    rest = shape[1:]
    extra = len(rest) - len(batch)
    axes = tuple(1 + a for a in range(max(extra, 0)))
    for pos, size in enumerate(batch):
        a = pos + extra
        if a >= 0 and size == 1 and rest[a] != 1:
            axes += (1 + a,)
    if axes:
        lp = ops.sum(lp, axes)
    lp = lp.reshape((k,) + tuple(lp.shape)[1 + max(extra, 0) :]) if extra > 0 else lp
    lp = ops.broadcast_to(lp, (k,) + tuple(batch))
    return lp.reshape((k * _numel(batch),))


def masked_log_prob(ops: ArrayOps, site: dict) -> Any:
    """A re-executed site's log density at its value, unscaled, zero where masked."""
    base, fn_mask = ops.unmask(site["fn"])
    lp = base.log_prob(site["value"])
    for m in (site.get("mask"), fn_mask):
        if m is None or m is True:
            continue
        lp = ops.where(ops.as_bool(m), lp, 0.0)
    return lp


def clean_observed(ops: ArrayOps, site: dict) -> Any:
    """A dependent observed site's value with masked entries replaced by a point of the
    support (``biject_to(support)(0)``), so that a masked NaN cannot reach a gradient;
    None when the site has no mask."""
    fn = site["fn"]
    _, fn_mask = ops.unmask(fn)
    value = ops.as_float(site["value"])
    batch = broadcast_shapes(tuple(value.shape)[: value.ndim - fn.event_dim], tuple(fn.batch_shape))
    masks = [m for m in (site.get("mask"), fn_mask) if m is not None and m is not True]
    if not masks or batch is None:
        return None
    mask = combine_masks(ops, site["name"], batch, *masks)
    value = ops.broadcast_to(value, batch + tuple(fn.event_shape))
    keep = mask.reshape(batch + (1,) * fn.event_dim)
    t = ops.transform(fn.support)
    if t is None:
        return ops.where(keep, value, 0.0)
    inside = t(ops.zeros_like(t.inv(value)))  # a point of the support, of the value's shape
    return ops.where(keep, value, inside)


def matched_density(
    ops: ArrayOps,
    blocks: Sequence[Block],
    deps: Dependencies,
    rerun: Callable[[dict], Mapping[str, Any]] | None,
) -> MatchedDensity:
    """Assemble the backend's ``fn``, data ``x`` and per-datum weights.

    Args:
        ops: the front end's array operations.
        blocks: the matched sites' blocks (``site_block``), in model order.
        deps: the dependency plan (``plan``).
        rerun: ``{matched site: constrained value [k, *batch, *event]} -> {site: log density
            [k, *site batch]}`` for every matched and dependent site, re-executing the model
            with the values substituted (masked, unscaled); used on the joint path only.

    Raises:
        ValueError: matched sites with different scales (poutine.scale / subsampling).
    """
    if any(not ops.same_scale(blk.scale, blocks[0].scale) for blk in blocks):
        raise frontend.scale_mismatch_error([blk.name for blk in blocks])
    per_datum = deps.per_datum
    batch = blocks[0].batch if per_datum else ()
    if not per_datum and _numel(getattr(blocks[0].scale, "shape", ())) > 1:
        raise frontend.joint_scale_error([blk.name for blk in blocks])
    n = _numel(batch)
    start = 0
    for blk in blocks:
        blk.start, blk.stop = start, start + _numel(blk.batch) * _numel(blk.uevent) // n
        start = blk.stop
    x = ops.concat([blk.u.reshape((n, -1)) for blk in blocks])
    joint = bool(deps.dependent)

    def fn(rows):
        k = rows.shape[0] // n  # the backend stacks copies / perturbations of the batch
        total = 0.0
        values = {}
        for blk in blocks:
            u = rows[:, blk.start : blk.stop].reshape((k,) + blk.batch + blk.uevent)
            if joint and blk.mask is not None:
                # a masked entry is not matched: dependent sites see its data, and its score is 0
                keep = blk.mask.reshape(blk.batch + (1,) * len(blk.uevent))
                u = ops.where(keep, u, blk.u)
            if not joint:
                lp = unconstrained_log_prob(ops, blk, u)
            elif blk.transform is None:
                values[blk.name], lp = u, None
            else:
                y = blk.transform(u)
                values[blk.name], lp = y, _ladj(blk, u, y)
                if blk.mask is not None:
                    lp = ops.where(blk.mask, lp, 0.0)
            if lp is not None:
                total = total + reduce_to_batch(ops, lp, k, batch)
        if joint:
            for lp in rerun(values).values():
                total = total + reduce_to_batch(ops, lp, k, batch)
        return total

    # a data point counts when any of its matched sites is unmasked
    weight = None
    if all(blk.mask is not None for blk in blocks):
        if per_datum:
            weight = ops.stack_any([blk.mask for blk in blocks]).reshape((n,))
        else:
            weight = ops.stack_any([blk.mask.reshape((-1,)).any().reshape((1,)) for blk in blocks])
        weight = ops.as_array(weight, x)
    scale = ops.scale_weights(blocks[0].scale, batch, n, x)
    if scale is not None:
        weight = scale if weight is None else weight * scale
    return MatchedDensity(fn, x, weight, per_datum, deps.dependent)
