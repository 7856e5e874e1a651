"""metric_ds: joint CE + SupCon training of text encoders."""
__version__ = "0.1.0"
