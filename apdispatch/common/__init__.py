"""What the AP, the workers and the tools all need: protocol stubs, tensors, errors,
outcomes, the model manifest and the process lifecycle."""

__version__ = "0.1.0"
