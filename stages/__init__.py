"""One module per stage: each wires library calls in `run(ctx) -> StageResult` and holds no model maths."""
