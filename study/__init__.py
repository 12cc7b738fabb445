"""The MST study: research tooling on top of the library, not part of it (nothing in ``mst_hf`` imports it, and the
wheel leaves it out). It imports only public ``mst_hf`` names, so every number it publishes comes from library code.

- ``data``: the study data from a study-corpus build (``python -m study.data``);
- ``arms``: the rung's model and the arms, matched to MST's plan (:func:`mst_hf.plan_run`);
- ``pricing``: a run's FLOPs under every convention of :mod:`mst_hf.conventions`;
- ``loop``: training one arm (the controller loop, :func:`mst_hf.schedule.lr_multiplier`);
- ``spikes``: loss spikes (unstable runs) in a run's logged training loss;
- ``noise``: the noise floor from seed spreads and same-seed repeats;
- ``sweep``: learning-rate sweeps, each arm's best LR and the command that confirms it;
- ``frontier``: the best dense run at each counted-FLOP budget against the sparse arms;
- ``report``: ``study.md`` and ``study.png`` from the runs' JSON records;
- ``run``: the command line and the launcher (``python -m study``).
"""
