"""Serving restore points: a read-only NBD export through nbdkit's Python plugin.

``nbdkit_plugin`` is the script nbdkit runs (in its own embedded Python); ``server``
starts, watches and stops that nbdkit process.
"""
