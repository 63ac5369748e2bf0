"""Training: state and optimizer, the step functions, FLOP accounting, the loop."""

# Host-batch keys that become global device arrays; the rest stay on the host.
DEVICE_KEYS = ("image", "text", "label", "source", "index")
