"""`edged bench`: edged measured against raw llama-cpp-python and llama-server on the same model and threads.

``cli`` is the command, ``runner`` runs workloads (``workloads``) on targets (``servers``, ``raw``) and
``report`` makes the document and table; ``synth`` and ``vocab`` write the R1-shaped model.
"""
