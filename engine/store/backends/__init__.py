"""Implementations of the ``Backend`` seam (``snapferry.engine.store.backend``)."""
