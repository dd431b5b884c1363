"""PDIQSMLib: Bayesian quantitative susceptibility mapping by Probabilistic Dipole Inversion.

The pipeline reads top-down through the modules: ``io`` and ``geometry`` bring a field map and its
geometry in (``units`` converts it to ppm once), ``physics`` is the dipole forward model,
``weighting`` and ``gradient`` build the data weight and the edge mask, ``solvers`` holds the MAP
baselines, ``network``/``training``/``inference`` the PDI model, ``metrics`` scores a result, and
``cli`` ties them into the ``pdiqsm`` command.
"""

__version__ = "0.1.0"
