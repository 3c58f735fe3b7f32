"""The framework-free half of the library: imports neither torch nor JAX.

The rule of the layout: ``ppl_score.common.X`` is the framework-free half of
``ppl_score.torch.X`` and ``ppl_score.jax.X`` (and of the front ends' module of the same
concern). It holds, once for both backends and both front ends, what does not depend on the
array library: the objectives registry and option resolution (``objectives``), argument
validation, the validation switch and warnings (``validate``), the options of the score
estimators (``estimators``, ``mmd``), the site logic of the front ends (``sites``,
``frontend``, ``implicit``, ``wae``, ``calibration``), the checks and plans of the
Langevin samplers, DEQ solvers and flows (``langevin``, ``deq``, ``flows``), and the
training loops' settings and checks (``training``).
``ppl_score.torch`` and ``ppl_score.jax`` mirror each other file for file with the same
public signatures; ``ppl_score.pyro`` and ``ppl_score.numpyro`` are thin adapters over them.
"""
