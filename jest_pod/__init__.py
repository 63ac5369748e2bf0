"""jest_pod: SigLIP-style two-tower training with joint example selection (JEST).

Data flows through the sub-packages in this order (shared/DESIGN.md §3):
  data/ -> models/ -> scoring + selection -> train/ -> checkpoint, evaluators/
"""

__version__ = "0.1.0"
