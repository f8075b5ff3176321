"""edged's MQTT client side, shared by the daemon's transport (`edged.transports.mqtt`), `edged ask
--mqtt` and `edged fleet`: `broker` (where the broker is and how to talk to it, without paho) and
`client` (the paho client built from those options, and the command-line tools' `Connection`).
"""
