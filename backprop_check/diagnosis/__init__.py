"""Reading a disagreement: which slip of a derivation a wrong gradient looks like (hints, shapes)
and the graph between a case's named nodes."""
