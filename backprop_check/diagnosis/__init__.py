"""Where a derivation breaks: verdicts and messages, hints, the graph between nodes, explain, trace, the Function contract."""
