"""Instant recovery: boot a VM straight from a restore point, then restore it live."""
