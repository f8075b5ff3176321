"""Transports translate between a wire protocol and the engine's job schema; nothing more."""
