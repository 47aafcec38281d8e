"""Where and how things run: devices and precision, torchrun processes, stop signals."""
