"""Layer 0, I/O: loading (checked: regular files, structure) and saving models (output sets: all or none), tensor bytes."""
