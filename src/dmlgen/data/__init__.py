"""dmlgen.data."""
