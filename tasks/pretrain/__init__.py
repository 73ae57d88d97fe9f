"""Stage pretrain: catalog images in, a DINO backbone out.

In: a catalog selection (``data.py``: SQL on ``images``, labelled test patients held out) and a config
(``deployments/pretrain/``). Out: a job folder under ``DAX_HOME/pretrain/``, an MLflow run and the
teacher backbone registered as ``dax-backbone-<arch>@candidate``. ``main_dino.py`` is the whole
training loop in one file (``python -m tasks.pretrain.main_dino JOB_DIR`` under torchrun);
``monitor.py`` what it is watched by; ``steps.py`` the job's steps as Prefect tasks.
"""
