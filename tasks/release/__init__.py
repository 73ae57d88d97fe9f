"""Stage release: registered models in, promoted aliases and predictions out.

``registry.py`` is the one MLflow module (store, model names, resolve, log); ``promotion.py`` sets
``@champion`` or ``@challenger``; ``predict.py`` runs the registered backbone and heads on DICOM files,
de-identified in memory as ingestion does. Prediction never imports training.
"""
