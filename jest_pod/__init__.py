"""jest_pod: SigLIP-style two-tower training with joint example selection (JEST).

Data flows through the sub-packages in this order (WORKSPACE_NOTES.md, "Layout"):
  data/ -> models/ -> scoring + selection -> train/ -> checkpoint, evaluators/
"""

__version__ = "0.1.0"
