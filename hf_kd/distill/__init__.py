"""The collaborators that `DistillationTrainer` wires together, each built from the config and the models."""
