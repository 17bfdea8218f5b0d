"""Pure algorithms: numpy/arrow in, numpy/arrow out. No Ray, no I/O."""
