"""Guest image recipes (Linux kernel + initramfs, bare-metal ELF) and their content-hash cache.

Artifacts live under ``images/cache/`` (git-ignored); see :mod:`images.cache`.
"""
