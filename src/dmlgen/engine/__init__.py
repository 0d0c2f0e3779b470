"""dmlgen.engine."""
