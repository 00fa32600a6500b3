"""The agent: claude (or another agent CLI) in, a verdict out."""
