"""The model registry (MLflow): versions, aliases and lineage of bases, fine-tunes, Δs and merged models.

mlflow is imported only inside this package. Modules: `names` (the schema: names, aliases, tags),
`client` (Registry: registration, reads, retries), `lease` (cross-process registration lease),
`lineage` (walks, Mermaid, Markdown descriptions), `lineage_plot` (the picture), `runs` (MLflow runs).
"""
