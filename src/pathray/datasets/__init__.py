"""Ray Data side of pathray: slide manifests, stratified splits, the online-patched tile stream."""
