"""Cluster plumbing: submitting work to Ray clusters and the like.

Free of kfp on purpose: the KFP components call into this package, never the other way round. Importing it
is cheap; ``ray`` and ``requests`` are imported inside the functions that talk to a cluster.
"""
