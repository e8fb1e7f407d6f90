"""Tools for CI: baselines, the pytest session, the gradcheck drop-in."""
