"""From files to points: loading case files, selecting them, the points they are checked at, calling user code, guards."""
