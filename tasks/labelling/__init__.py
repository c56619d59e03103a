"""Labelling: the texts people should label, the forms they answer in the Prefect UI, where the labels go."""
