"""lorasched.evaluation: how good a scheduled file is — `verify` (replay against its online rule), the fidelity
metrics, `eval` (files side by side) and `--balance auto` (the balance knob searched on probe generations)."""
