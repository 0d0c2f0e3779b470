"""dmlgen.evaluation."""
