"""What a person at a terminal sees of a run: the live progress display (``progress``),
what is printed once it is over (``summary``), and the lines that describe a source's
listing and a queue (``lines``, also in ``status``).

The command line starts the display; the engine only hands out its live counters."""
