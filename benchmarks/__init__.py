"""jkoflow's performance suite: ``python -m benchmarks [--quick] [--only trace,step,memory]``.

Each benchmark module has a ``run(...)`` returning a :class:`benchmarks.common.Table`
and a ``SIZES`` dict of presets (``full``, ``quick``, ``smoke``); :mod:`benchmarks.run`
prints the tables and saves them as CSV and markdown.
"""
