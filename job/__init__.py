"""Cluster submission of mnist_add's training job (submitit); see job/submit.py."""
