"""Datasets, augmented views and the one data module shared by every method."""
