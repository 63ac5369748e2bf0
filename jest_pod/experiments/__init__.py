"""What users run to see the method work: `jest-pod demo`, `jest-pod sweep` (+ its report),
`jest-pod plot` (and the one reader of metrics.jsonl), `jest-pod bench`."""
