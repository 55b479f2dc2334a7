"""GCSAM inside the trainers people already use; each submodule needs its framework.

* :mod:`gcsam.integrations.lightning`: PyTorch Lightning (``pip install "gcsam[lightning]"``).
* :mod:`gcsam.integrations.transformers`: Hugging Face ``Trainer``
  (``pip install "gcsam[transformers]"``).

Nothing here is imported by ``import gcsam``, which needs torch alone.
"""
