"""What the user writes, as data: cases (@case, node), function checks, layer pairs, nn.Module and
numpy cases, the points they are checked at, the call of their forward pass, case files."""
