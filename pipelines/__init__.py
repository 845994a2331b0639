"""KFP v2 pipelines chaining the components; `idforge pipeline compile` writes them to pipelines/compiled/."""
