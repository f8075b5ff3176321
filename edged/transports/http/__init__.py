"""The HTTP side of edged, shared by the Unix socket and the TCP listener."""
