"""Measurements edged reports about itself: throughput now, thermals with their own issue."""
