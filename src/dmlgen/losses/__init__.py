"""dmlgen.losses."""
