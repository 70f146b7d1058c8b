"""Search over an index folder: the engine, query planning, the diagnosis suggestion
and the cohort insights."""
