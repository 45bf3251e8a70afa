"""Per-timestep analysis of the importance weights, the mask and each objective's gradient.

``run_analysis(config)`` (``train_sipo.py --preset P --analyze``) writes
``<output_dir>/analysis/analysis.json`` and PNG plots; the statistics are pure functions in
``stats``, the model pass in ``collect``, the figures in ``plots``.
"""

from .run import run_analysis

__all__ = ["run_analysis"]
