"""What leaves a run: the kohya file, output names, and what a weights file is."""
