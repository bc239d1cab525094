"""Layer 0, I/O: loading and saving models (external data, atomic and streamed writes), tensor bytes."""
