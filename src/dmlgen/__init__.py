"""dmlgen: deep metric learning that generalizes to unseen classes."""

__version__ = "0.1.0"
