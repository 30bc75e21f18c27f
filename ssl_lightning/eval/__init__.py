"""Offline evaluation of a frozen checkpoint (any method)."""
