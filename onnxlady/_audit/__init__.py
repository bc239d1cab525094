"""Layer 6, audit: verdicts and forensics over a resync, and their renderings."""
