"""`turbotune check`: the environment check and the on-device self test."""
