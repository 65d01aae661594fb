"""The model registry (MLflow): versions, aliases and lineage of bases, fine-tunes, Δs and merged models.

mlflow is imported only inside this package. Modules: `names` (the schema: names, aliases, tags),
`client` (Registry: registration, reads, retries), `lease` (cross-process registration lease),
`lineage` (walks), `lineage_graph` (the picture, Mermaid), `describe` (what the UI shows on a version),
`runs` (opening MLflow runs), `runlog` (logging into them).
"""
