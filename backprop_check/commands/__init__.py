"""The commands: what a user calls (the Python API, the CLI, the pytest session, the drop-in
gradcheck, baselines, explain and trace)."""
