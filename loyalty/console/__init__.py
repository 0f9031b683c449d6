"""The operator console (``/console``): server-rendered pages over the application use cases."""
