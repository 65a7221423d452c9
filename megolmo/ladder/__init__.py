"""Task-scaling ladders (Bhagia et al., 2024): plan a ladder of small OLMo 2 models, train it through the
launchers, fit task loss from size and tokens and accuracy from task loss, and predict a large model's
downstream accuracy from ~1% of its compute.

``python -m megolmo.ladder plan|run|fit|predict``; ``python -m megolmo.ladder.miniature`` (``make ladder-demo``)
runs all of it on tiny models.
"""
