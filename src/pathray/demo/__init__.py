"""The embedded end-to-end demo: ``pathray demo`` on nothing but the install."""
