"""Evaluation: answer files, accuracy against cost, equal-budget comparisons, kept-patch pictures.

``loading`` (checkpoint -> model), ``questions`` (shards or a LLaVA question file), ``runner`` (one
method at one keep ratio), ``compare`` (the equal-budget table and Pareto plot), ``answers`` (LLaVA's
answer-file format), ``scoring`` (exact match, VQA accuracy), ``overlay`` (kept-patch pictures),
``plots`` (tables and trade-off plots, also used by notebooks/keep_sweep.ipynb).
"""
