"""Monitoring and reporting callbacks, each independent and configurable from YAML."""
from ssl_lightning.callbacks.knn import KNNMonitor
from ssl_lightning.callbacks.preemption import PreemptionHandler
from ssl_lightning.callbacks.spectrum import SpectrumMonitor
from ssl_lightning.callbacks.summary import FitSummary

__all__ = ["FitSummary", "KNNMonitor", "PreemptionHandler", "SpectrumMonitor"]
