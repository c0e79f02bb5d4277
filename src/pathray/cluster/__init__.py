"""Embedded local defaults (object store, local Ray) and job submission to Ray clusters."""
