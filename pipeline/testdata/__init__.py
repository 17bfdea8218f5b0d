"""Images for the demo, the benches and the tests: real photographs shipped by installed
packages, rendered non-natural images (maps, slides, documents...), hostile files. Not used by a run."""
