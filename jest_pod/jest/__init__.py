"""JEST as one object: a super-batch in, the selected batch out (see `step.py`)."""
