"""The loop and what it needs: loss, optimizer, progress, checkpoints, resumable state, samples."""
