"""The check: the run plan, tolerances, the elementwise and directional comparison, other references."""
