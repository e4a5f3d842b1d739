"""The operator's controllers, one module each, registered in `registry.py`."""
