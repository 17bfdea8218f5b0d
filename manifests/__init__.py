"""The contract every layer shares, Ray-free: the config models (``config``), the schemas,
stages and reasons (``schema``), the reject bookkeeping (``rejects``) and manifest I/O (``io``)."""
