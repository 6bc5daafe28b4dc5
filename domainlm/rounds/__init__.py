"""The daily round: ``dvc repro`` with the deployed model evaluated first, then decide, promote, push,
commit, tag and redeploy, under one lock. ``python -m domainlm.rounds --help`` lists the commands.

- :mod:`domainlm.rounds.promotion`: the bootstrap ``models/deployed``, the promote decision and the promote itself.
- :mod:`domainlm.rounds.server`: serving ``models/deployed`` with ``mlflow models serve`` and swapping servers.
- :mod:`domainlm.rounds.daily`: one round, end to end, and its exit codes.

No DVC stage imports this package: it runs *around* ``dvc repro`` (a stage cannot write its own input).
"""
