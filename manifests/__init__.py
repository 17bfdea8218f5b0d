"""The data contract (schemas, reasons) and manifest I/O."""
