"""torchslim: make trained PyTorch models smaller and faster while keeping their accuracy."""
__version__ = "0.1.0"
