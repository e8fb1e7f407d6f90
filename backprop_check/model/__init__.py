"""What the user writes: case files (@case, node), function checks, layer pairs, nn.Module and numpy cases."""
