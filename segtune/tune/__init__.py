"""``segtune tune``: hyperparameter search on Optuna, pruned, resumable, shared by processes and machines.

One job per module: :mod:`.space` reads the search file, :mod:`.checks` checks it against ``segtune fit``'s
parser, :mod:`.storage` opens the study's database, :mod:`.trial` runs one trial as an ordinary fit
(:mod:`.child` in a process of its own when it needs several: DDP),
:mod:`.callbacks` holds the two callbacks a trial adds, :mod:`.report` writes the report and ``best.yaml``,
and :mod:`.command` ties them together. Optuna is imported only when a study runs (``pip install segtune[tune]``).
"""
