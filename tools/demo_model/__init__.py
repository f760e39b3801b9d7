"""The demo model's training lab: the script that trains the tiny LLaVA shipped in ``flowkern/demo/model``, its
probes, and the records of the runs behind the recipe (``results/``; the README beside this file has the recipe and
the experiment table).

Modules: ``config`` (``TrainConfig`` and the fixed tables), ``data`` (the training stream), ``losses`` (the patch
loss, position code, guide loss, schedule), ``loop`` (``train``), ``train`` (the command line, ``python -m
tools.demo_model.train``), ``probe_tower`` and ``probe_names`` (what a trained model's image tokens and residual
stream carry). flowkern does not import any of it.
"""
