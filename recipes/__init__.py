"""Training recipes built from advtrain's primitives (an importable package: submitit pickles by reference)."""
