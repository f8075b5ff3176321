"""Working with a fleet of edged devices from the outside (over MQTT)."""
