"""dmlgen.reporting."""
