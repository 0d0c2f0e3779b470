"""dmlgen.models."""
