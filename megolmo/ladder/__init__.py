"""Task-scaling ladders (Bhagia et al., 2024): plan a ladder of small OLMo 2 models, fit task loss from size
and tokens and accuracy from task loss, and predict a large model's downstream accuracy from ~1% of its compute.

``python -m megolmo.ladder plan|fit|predict`` (``run``, which trains the plan's runs, is not there yet).
"""
