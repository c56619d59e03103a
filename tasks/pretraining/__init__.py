"""Domain- and task-adaptive pre-training: masked-language-model training of the encoder on unlabelled text."""
