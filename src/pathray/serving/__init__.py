"""Ray Serve: the analysis app (ingress + multiplexed, autoscaled model replicas) and its client."""
