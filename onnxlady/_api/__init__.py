"""Layer 7, the public API: one function per command, typed results; the CLI is a thin shell over it."""
