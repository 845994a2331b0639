"""Generation driver and evaluation: metrics, protocol, HTML report, MLflow logging, registry gates.

Modules import their heavy dependencies (torch, transformers, mlflow, the face backends) inside functions, so
importing this package is cheap.
"""
