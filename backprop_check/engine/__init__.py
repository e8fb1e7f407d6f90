"""The check, one pipeline: the run plan and its points, guards, the three sources compared
element by element and along directions, tolerance and rounding, verdicts; the contract, the
outputs of a function check, higher orders and forward mode, kernels against a reference and
distributed checks as transformations that feed the same pipeline."""
