"""KFP v2 components: one per stage, each a thin wrapper over a public idforge function."""
