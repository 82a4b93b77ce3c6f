"""vdev's compiled code: every ``*.c`` here is linked into one cffi module by ``build.py``.

Python modules that use it (``vdev/skywalk/fastglue.py`` for the Skywalk slot loops) load it
through :func:`vdev.native.build.load`; the Python implementations stay the reference.
"""
