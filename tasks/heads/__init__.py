"""Stage heads: a registered backbone and labels in, evaluated heads on the FROZEN backbone out.

In: a backbone URI, the labels joined to the catalog (``data.py``). Out: cached features
(``features.py``), heads trained per task and seed (``training.py``) against the random-init twin,
metrics at native resolution (``evaluation.py``), figures (``figures.py``), the results table
(``results.py``) and the heads registered as ``dax-head-<task>-<arch>``; ``steps.py`` holds the
fan-out's Prefect tasks.
"""
