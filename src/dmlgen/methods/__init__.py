"""dmlgen.methods."""
