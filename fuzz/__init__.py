"""Coverage-guided fuzzing of every trust boundary with atheris (issue 12 item 1).

One harness module per boundary (``fuzz/t_<target>.py``), each with ``one_input(data)``:

* ``vhost``: the vhost-user message stream into the backend, with ancillary fds;
* ``virtqueue``: split and packed virtqueues with hostile descriptor tables, rings, indices;
* ``skywalk``: Skywalk channel syncs with hostile user memory, both validate.py backends;
* ``scenario``: scenario TOML files;
* ``control``: control-socket JSON requests.

``python -m fuzz.run TARGET [libFuzzer flags] [corpus dirs]`` runs one under libFuzzer;
``bash scripts/fuzz.sh [TARGET] [--runs N]`` runs them all and prints the table.  A harness
raises :class:`~fuzz.common.FuzzLeak` for a resource it finds left behind (counted as a
leak, not a crash); any other exception that escapes is a crash.
"""
