"""Training: state and optimizer, the step functions, FLOP accounting, the loop."""
